"""Reading weight files: a model's safetensors (checked against the digest it was saved with)
and published PyTorch ``.pth`` files (tensors only, never code)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from tokenizers_vq.io import state_sha256


def load_weights(path: str | os.PathLike, what: str) -> dict:
    """``torch.load`` of a published weights file (tensors only, never code), refusing a
    file that is not one with an error naming ``what`` was expected there."""
    import pickle  # noqa: PLC0415

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:  # (torch's own advice, to
        # load it with weights_only=False, would run whatever code the file holds: not given here)
        raise ValueError(f"{path} is not a PyTorch weights file of tensors ({what} expected; {type(e).__name__}: "
                         "a damaged or unfinished download? download it again)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else "a dict of values other than tensors"
        raise ValueError(f"{path} holds {kind}, not the state dict of {what}")
    return state


@contextlib.contextmanager
def safetensors_name(path: str | os.PathLike) -> Iterator[str]:
    """A name of ``path`` that ``safetensors.safe_open`` accepts. It takes UTF-8 names only; a
    Linux file name may hold other bytes, and is then opened and named by its descriptor
    (``/proc/self/fd/N``) for the ``with`` block. Elsewhere (no such names there) it is refused,
    naming the fix.

    Raises:
        OSError: the file cannot be opened.
        ValueError: a name that is not UTF-8 where no descriptor path exists.
    """
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        if not sys.platform.startswith("linux"):
            raise ValueError(f"{path!r}: its name is not valid UTF-8, which safetensors cannot open: rename it") from None
        fd = os.open(name, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield name


def load_weights_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors weights file (one read), refused when unreadable, when they differ from
    the ``tensors_sha256`` they were saved with (:func:`~tokenizers_vq.io.save_safetensors`), or when a
    floating-point tensor holds NaN or inf (every id of such a model is 0).

    Raises:
        ValueError: naming the file, what is wrong and the fix.
    """
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safetensors_name(path) as name, safe_open(name, framework="pt") as f:
            state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt weights file {path}: {e}") from e
    if (recorded := meta.get("tensors_sha256")) is not None and recorded != state_sha256(state):
        raise ValueError(f"corrupt weights file {path}: its tensors differ from those it was saved with "
                         "(tensors_sha256 in its header): a damaged copy; copy or download it again")
    if bad := [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise ValueError(f"weights file {path} holds NaN or infinite values ({', '.join(bad[:3])}): a damaged file, "
                         "or the weights of a training that diverged; load an earlier checkpoint")
    return state, meta
