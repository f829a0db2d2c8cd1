"""The export's input pipeline: files read and decoded in loader workers, in file order,
and encoded in batches of equal shape with the device kept busy
(:func:`read_inputs`, :func:`encode_batches`; :mod:`tokenizers_vq.export` writes the shards)."""

from __future__ import annotations

import contextlib
import copy
import math
import traceback
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from tokenizers_vq.deferred import deferred_checks
from tokenizers_vq.errors import ItemError, MissingDependency
from tokenizers_vq.image_io import fit_image
from tokenizers_vq.media import MAX_PIXELS
from tokenizers_vq.modality import get as get_modality
from tokenizers_vq.quantizers import PackedCodes
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import check_input_modality
from tokenizers_vq.webdataset import TarSample


class _Inputs(Dataset):
    """Files read as a tokenizer's compact inputs (:meth:`~tokenizers_vq.modality.Modality.load_compact`),
    one per index: what the export's loader workers run. A file the reader refuses comes back
    as its ``ValueError``, raised again in the main process as the reader worded it. ``fit``:
    images as :func:`~tokenizers_vq.image_io.fit_image` makes them, ``(side, crop)``."""

    def __init__(self, files: list[Path | TarSample], modality: str, sample_rate: int | None,
                 fit: tuple[int, bool] | None = None):
        self.files, self.modality, self.sample_rate, self.fit = files, modality, sample_rate, fit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, list[int], dict[str, Any]] | ValueError:
        f = self.files[i]
        limit = None if self.fit else MAX_PIXELS  # resized first: the encoder never sees the photo's own size
        try:
            if isinstance(f, TarSample):
                x, size, info = f.load(self.modality, self.sample_rate, max_pixels=limit)
            else:
                x, size, info = get_modality(self.modality).load_compact(f, self.sample_rate, max_pixels=limit)
            if self.fit is None:
                return x, size, info
            pixels = x if x.dtype == torch.uint8 else ((x + 1) * 127.5).round().to(torch.uint8)  # a tar's float read
            try:
                x = fit_image(pixels, *self.fit, max_pixels=MAX_PIXELS)
            except ValueError as e:
                return ValueError(f"{f}: {e}")
            return x, list(x.shape[1:]), info
        except (ValueError, MissingDependency) as e:  # the reader's words, raised as they are in the main process
            return e


class _Chunks(Dataset):
    """Runs of ``k`` consecutive inputs of :class:`_Inputs`, one per index: a loader
    worker hands the main process a run at a time, its tensors in one buffer (one shared
    memory transfer instead of ``k``: the per-item transfer, not decoding, capped a
    many-worker reader at about 1,000 photos/s)."""

    def __init__(self, inputs: _Inputs, k: int):
        self.inputs, self.k = inputs, k

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.k)

    def __getitem__(self, j: int):
        items = []
        for i in range(j * self.k, min(len(self.inputs), (j + 1) * self.k)):
            try:
                items.append(self.inputs[i])
            except Exception as e:  # noqa: BLE001  (raised at its own file, after the files before it)
                items.append(RuntimeError(f"reading {self.inputs.files[i]}: {type(e).__name__}: {e}\n"
                                          f"{''.join(traceback.format_exception(e))}"))
                break
        tensors = [it[0] for it in items if not isinstance(it, Exception)]
        if len(tensors) != len(items) or len({t.dtype for t in tensors}) != 1:
            return items, None  # a refused file or mixed types: as they are
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return flat, [(tuple(t.shape), size, info) for t, (_, size, info) in zip(tensors, items)]

    @staticmethod
    def unpack(chunk) -> Iterator:
        """The run's inputs one by one, each in its own memory (an input waiting for a
        batch does not keep the rest of its run alive)."""
        flat, meta = chunk
        if meta is None:
            yield from flat
            return
        offset = 0
        for shape, size, info in meta:
            n = math.prod(shape)
            yield flat[offset : offset + n].view(shape).clone(), size, info
            offset += n


def read_inputs(tok: Tokenizer, files: list[Path], workers: int, batch_size: int = 1,
                fit: tuple[int, bool] | None = None) -> Iterator[tuple[Path, tuple[Tensor, list[int], dict]]]:
    """``(file, (x, size, info))`` in file order, read and decoded in ``workers``
    processes (0: in this one) ahead of the caller, at least two batches of
    ``batch_size`` ahead; ``x`` is compact (:meth:`~tokenizers_vq.modality.Modality.load_compact`:
    uint8 pixels for images, a quarter of the bytes through the loader; ``fit``: images
    resized, and cropped, as :func:`~tokenizers_vq.image_io.fit_image` does); the order and
    the values do not depend on the number of workers."""
    for f in files:
        if not isinstance(f, TarSample):  # tar samples are listed by the model's modality
            check_input_modality(tok, f)
    data = _Inputs(files, tok.modality, tok.sample_rate, fit)
    if any(isinstance(f, TarSample) for f in files):
        workers = 0  # one forward pass over each archive, here: a worker would read its own from the start
    if workers <= 0 or len(files) < 2:
        items: Iterator = (data[i] for i in range(len(files)))
    else:
        from torch.utils.data import DataLoader  # noqa: PLC0415

        k = min(8, -(-len(files) // workers))  # inputs per transfer
        chunks = _Chunks(data, k)
        n = min(workers, len(chunks))
        loader = DataLoader(chunks, batch_size=None, num_workers=n, prefetch_factor=max(2, -(-2 * batch_size // (n * k))))
        items = (item for chunk in loader for item in _Chunks.unpack(chunk))
    try:
        for f, item in zip(files, items):
            if isinstance(item, Exception):  # a refused file (the reader's words) or a failed read
                raise item
            yield f, item
    finally:  # the loader's workers end here, before a caller holding a raised error's traceback lets go of it
        items.close()


def autocast_weights(tok: Tokenizer, dtype: torch.dtype) -> Tokenizer:
    """``tok`` with its encoder's convolution and linear weights and biases stored in ``dtype``,
    for encoding under ``dtype`` autocast: those are the casts autocast makes on every call
    (a few percent of a CPU encode), made once. The codes are the same bit for bit; ``tok``
    itself is left as it is (the copy shares its other modules)."""
    encoder = copy.deepcopy(tok.encoder)
    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, kinds) and not parametrize.is_parametrized(m):
                for name in ("weight", "bias"):
                    p = getattr(m, name)
                    if p is not None and p.is_floating_point():
                        cl = p.ndim == 4 and p.device.type == "cpu"  # the CPU encoder runs channels-last
                        p = p.to(dtype, memory_format=torch.channels_last) if cl else p.to(dtype)
                        setattr(m, name, torch.nn.Parameter(p, requires_grad=False))
    out = copy.copy(tok)
    out._modules = {**tok._modules, "encoder": encoder}
    return out


def padded_batch(n: int, batch_size: int) -> int:
    """The batch ``n`` inputs of one shape are encoded in on a GPU: ``n`` rounded up to a
    quarter of ``batch_size`` (at most ``batch_size``). Shorter groups (another shape's
    inputs pending, a shard's last ones) then come in a few sizes (four when ``batch_size``
    is a multiple of 4), not up to ``batch_size``: each new input shape costs the GPU
    libraries a plan and kernels of their own on first use."""
    q = max(1, batch_size // 4)
    return min(max(batch_size, n), -(-n // q) * q)


FLUSH = object()
"""An item of :func:`encode_batches`' input: every pending group is encoded now, so no later
input shares a batch with an earlier one (the export puts one after each shard)."""


def encode_batches(
    tok: Tokenizer, items: Iterator[tuple[Path, tuple[Tensor, list[int], dict]]], batch_size: int,
    precision: str = "fp32", pad: bool | None = None,
) -> Iterator[tuple[list[tuple[Path, list[int], dict[str, Any]]], Tensor | PackedCodes]]:
    """Encode read inputs (as :func:`read_inputs` yields them) of equal shape together,
    ``batch_size`` at a time (expanded to model input on the model's device), every group
    encoded once ``items`` ends; at most
    ``2 * batch_size`` decoded inputs wait in memory (when that many are pending in groups
    of other shapes, all groups are encoded), plus one encoded batch held back until the
    next is queued. With ``pad`` (default: on a GPU) a shorter group is filled up to
    :func:`padded_batch` with copies of its last input, whose codes are dropped (not for a
    dynamic-length tokenizer). ``precision="bf16"``: under bf16 autocast (the encoder's
    weights cast once, :func:`autocast_weights`).

    On a GPU the host never waits for more than the batch it hands on: a batch is stacked in
    pinned memory and copied without a stream sync; its codes and its encode's NaN/Inf check
    values (:mod:`tokenizers_vq.deferred`) are copied back asynchronously right behind its
    encode; it is handed on (codes on the CPU, checks raised) only after the next batch is
    queued, so reading and stacking the next batch overlaps the encode of this one.

    Yields:
        ``(chunk, encoded)``: ``(file, size, info)`` per file of the chunk and
        ``tok.encode`` of their stacked inputs.
    """
    device = next(tok.parameters()).device
    padding = (device.type == "cuda" if pad is None else pad) and not tok.is_dynamic
    model = autocast_weights(tok, torch.bfloat16) if precision == "bf16" else tok
    step = max(1, batch_size)
    pending: dict[tuple, list[tuple[Path, Tensor, list[int], dict[str, Any]]]] = defaultdict(list)

    def encode(group: list[tuple[Path, Tensor, list[int], dict[str, Any]]]):
        first = group[0][1]
        xs = [x for _, x, _, _ in group]
        n = padded_batch(len(xs), step) if padding else len(xs)
        xs += xs[-1:] * (n - len(xs))  # copies of the last input, their codes dropped below
        staged = torch.empty((n, *first.shape), dtype=first.dtype, pin_memory=device.type == "cuda")
        x = torch.stack(xs, out=staged).to(device, non_blocking=True)
        # video: expanded to floats a clip at a time (clips are coded apart), not a whole long clip at once
        parts = x.split(tok.config.clip_frames, dim=2) if tok.media.clips and not tok.is_dynamic else [x]
        chunk = [(f, size, info) for f, _, size, info in group]
        with _said_of(chunk), deferred_checks() as checks:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                encoded = [model.encode(tok.media.expand(p)) for p in parts]
                encoded = torch.cat(encoded, 1) if len(encoded) > 1 else encoded[0]
        if n > len(group):
            encoded = encoded[: len(group)]
        if device.type != "cuda":
            return chunk, encoded, checks, None
        # copied back in stream order right behind this batch's encode: handing the batch on then
        # waits for it alone, not for the next batch queued behind it
        checks.to_host()
        if isinstance(encoded, Tensor):
            encoded = encoded.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))  # the model's device, where the copies ran
        return chunk, encoded, checks, done

    def groups():
        for item in items:
            if item is FLUSH:
                for key in list(pending):
                    yield pending.pop(key)
                continue
            f, (x, size, info) = item
            shape = (x.dtype, *x.shape)  # a video file's bytes and a frame folder's floats batch apart
            pending[shape].append((f, x, size, info))
            if len(pending[shape]) == step:
                yield pending.pop(shape)
            elif sum(map(len, pending.values())) >= 2 * step:
                for key in list(pending):
                    yield pending.pop(key)
        for key in list(pending):
            yield pending.pop(key)

    def settled(chunk, encoded, checks, done):
        if done is not None:
            _wait(done)
        with _said_of(chunk):
            checks.raise_if_failed()
        return chunk, encoded

    previous, grouped = None, groups()
    while True:
        try:
            group = next(grouped, None)
            if group is None:
                break
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                current = encode(group)  # kernels on the model's device, whichever is current
        except Exception:  # a failed read or encode: what came before it is handed on first
            if previous is not None:
                yield settled(*previous)  # (its own deferred failure, if any, is raised here instead)
            raise
        if previous is not None:
            yield settled(*previous)
        previous = current
    if previous is not None:
        yield settled(*previous)


def _wait(event: torch.cuda.Event) -> None:
    """Wait for one batch's encode and copies (the host's only wait between batches)."""
    event.synchronize()


@contextlib.contextmanager
def _said_of(chunk: list[tuple[Path, list[int], dict[str, Any]]]) -> Iterator[None]:
    """A ``ValueError`` inside (the tokenizer's refusal: too small, NaN) names the chunk's files."""
    try:
        yield
    except ItemError as e:  # one item at fault: named alone
        raise ValueError(f"{chunk[e.item][0]}: {e.reason}") from e
    except ValueError as e:
        raise ValueError(f"{chunk[0][0] if len(chunk) == 1 else [str(f) for f, *_ in chunk]}: {e}") from e
