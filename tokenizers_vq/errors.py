"""Errors the library raises for the user to act on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


UNREADABLE = "(a damaged or cut-short file, or not the type its suffix says: copy or export it again)"
"""What a reader's own error on a media file most likely means, and the fix."""

EMPTY_NAME = "an empty file name: name a file or folder (a command that was to give one printed nothing?)"
"""The refusal of ``""`` as a path (read as the folder ``.`` otherwise)."""


def named_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path`, a leading ``~`` expanded to the home folder (as a
    shell would); ``""`` refused with :data:`EMPTY_NAME`."""
    if os.fspath(path) == "":
        raise ValueError(EMPTY_NAME)
    return Path(path).expanduser()


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message names the package
    and the ``pip install`` that adds it (``tvq`` prints it as one error line)."""


def optional_module(name: str, what: str, package: str, extra: str):
    """The module ``name``, imported; where it is not installed, :class:`MissingDependency`
    saying that ``what`` needs ``package`` and the package extra ``extra`` that installs it;
    where it is installed but its import fails (a module it needs is missing or broken), one
    saying so with the import's own error."""
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(name)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == name:
            raise MissingDependency(f"{what} needs {package}: pip install {package} (or the package's {extra} extra: "
                                    f"pip install 'tokenizers_vq[{extra}]')") from e
        lacks = f"install what it lacks (pip install {e.name}) or " if e.name and e.name != name else ""
        raise MissingDependency(f"{what} needs {package}, which is installed but does not import ({e}); {lacks}"
                                f"reinstall it: pip install --force-reinstall --no-deps {package}") from e


class WriteError(OSError):
    """A file could not be written (a folder that cannot be made, a full disk); the message
    names the file the caller asked for. ``tvq`` prints it as one error line."""


class ItemError(ValueError):
    """A refusal of one item of a batch: ``item`` is its index, so a caller that knows the
    items' names can name the one at fault; ``reason`` is the message without the index."""

    def __init__(self, reason: str, item: int, of: int):
        super().__init__(reason if of == 1 else f"{reason} (item {item} of a batch of {of})")
        self.reason, self.item = reason, item


def not_a_float_tensor(x: object) -> str:
    """What a value given where a floating-point torch tensor is needed is, and the fix: a NumPy
    array (``torch.from_numpy``), another type, or a tensor of another dtype."""
    if type(x).__module__ == "numpy" and hasattr(x, "dtype"):
        return f"got a NumPy array of {x.dtype} (torch.from_numpy(x).float() makes one)"
    dtype = getattr(x, "dtype", None)
    return f"got a tensor of {dtype}" if isinstance(dtype, torch.dtype) else f"got {type(x).__name__}"


_PACKAGES = ("tokenizers_vq", "tokenizers_vq.train", "tokenizers_vq.kernels", "tokenizers_vq.eval")


def show_warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for a command: ``tvq: warning: ...`` as one line above any
    progress bar (not Python's file, line and source); another library's says where it comes from."""
    from tqdm import tqdm  # noqa: PLC0415

    roots = [Path(sys.modules[n].__file__).resolve().parent for n in _PACKAGES if n in sys.modules]
    ours = any(Path(filename).resolve().is_relative_to(r) for r in roots)
    tqdm.write(f"tvq: warning: {message}{'' if ours else f' ({category.__name__}, {filename}:{lineno})'}", file=sys.stderr)


def unused_option(flag: str, given: object, why: str) -> None:
    """Say (one ``tvq: warning:`` line) that ``flag``, given (truthy ``given``), does nothing here, and ``why``."""
    if given:
        print(f"tvq: warning: {flag} is not used here ({why})", file=sys.stderr)
