"""Export a media folder to sharded token files an AR trainer can memory-map (read them
with :class:`~tokenizers_vq.token_dataset.TokenDataset`, also importable from here).

Layout of an export directory (``tvq-shards/1``):

- ``shard_00000.bin`` ...: one flat little-endian array per shard (``uint16`` when the
  codebook has at most 65536 codes, else ``uint32``): the items' codes one after the
  other, each in C order of its shape ``(*grid, *code_shape)``.
- ``shard_00000.json`` ...: that shard's index: per item ``source``, ``offset`` and
  ``length`` (in tokens), ``shape``, original ``size`` and ``info``.
- ``manifest.json`` (written last): ``format``, ``model_id``, ``modality``,
  ``codebook_size``, ``code_shape``, ``dtype``, ``layout``, ``shards``, ``num_items``,
  ``num_tokens``, ``items_per_shard`` and ``tokens_per_shard`` (one count per shard).
  :class:`TokenDataset` checks these counts against the index files and the token
  arrays' sizes when it opens the export.
- ``export.json`` (written before the first shard): what the export is made from
  (:func:`~tokenizers_vq.export_record.fingerprint`): the model (id, config, sha256 of
  its weights), the inputs (path as given, bytes, mtime), ``format``,
  ``shard_items``, ``dtype`` and ``layout``.

``layout`` is ``"grid"`` (fixed-shape codes, the default of older exports) or
``"dynamic"`` (a tokenizer with a :class:`~tokenizers_vq.quantizers.DynamicQuantizer`
bottleneck, ``QuantizerConfig.dynamic``: variable-length codes, as ``Tokenizer.encode``
gives them). A dynamic item's codes are its packed tokens ``(N, *code_shape)``
(``shape`` in the index) and its index entry adds ``grid``, the dense latent shape; a
parallel ``shard_00000.layout.bin`` (``<u4``, written before the ``.bin``) holds one row
``(cell, granularity)`` per packed token: the raster index of its latent cell (a coarse
token's region's first cell) and 0 for a coarse token (a region of 2, 2x2 or 2x2x2
cells), 1 for a fine one (one cell). Row ``r`` describes codes ``[r*P, (r+1)*P)``,
``P = prod(code_shape)``.

Shard ``k`` always holds files ``[k*S, (k+1)*S)`` of the sorted file list, and each
shard is written atomically (``.bin`` then ``.json``), so an interrupted export
resumes by skipping finished shards and never leaves a half-written one. A rerun
resumes only when its fingerprint equals the recorded ``export.json``; otherwise it
is refused, naming what differs, unless ``overwrite=True`` (``tvq export
--overwrite``), which first deletes the files an export writes (and no others).

Under a process group of several ranks (``accelerate launch -m tokenizers_vq.cli export
...``, ``torchrun``, or the Python API with ``torch.distributed`` initialised) rank ``r``
of ``W`` encodes shards ``r, r + W, ...``: the same shards as one process, so the export is
byte-identical whatever the number of ranks. Rank 0 records ``export.json`` before any
rank writes and the manifest after every rank has finished; a killed run resumes on each
rank by skipping its finished shards; a rank that fails stops the others with its error.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import traceback
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from tokenizers_vq import distributed
from tokenizers_vq.export_record import START_OVER, claim, fingerprint
from tokenizers_vq.io import atomic_write
from tokenizers_vq.media import MAX_PIXELS
from tokenizers_vq.modality import get as get_modality
from tokenizers_vq.quantizers import PackedCodes
from tokenizers_vq.runtime import keep_freed_memory
from tokenizers_vq.token_dataset import FORMAT, TokenDataset, Vocabulary, check_shard, token_dtype  # noqa: F401
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import TokenRecord, check_input_modality
from tokenizers_vq.webdataset import TarSample, close_readers

class _Inputs(Dataset):
    """Files read as a tokenizer's compact inputs (:meth:`~tokenizers_vq.modality.Modality.load_compact`),
    one per index: what the export's loader workers run. A file the reader refuses comes back
    as its ``ValueError``, raised again in the main process as the reader worded it."""

    def __init__(self, files: list[Path | TarSample], modality: str, sample_rate: int | None):
        self.files, self.modality, self.sample_rate = files, modality, sample_rate

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, list[int], dict[str, Any]] | ValueError:
        f = self.files[i]
        try:
            if isinstance(f, TarSample):
                return f.load(self.modality, self.sample_rate)
            return get_modality(self.modality).load_compact(f, self.sample_rate, max_pixels=MAX_PIXELS)
        except ValueError as e:
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


def _read(tok: Tokenizer, files: list[Path], workers: int,
          batch_size: int = 1) -> Iterator[tuple[Path, tuple[Tensor, list[int], dict]]]:
    """``(file, (x, size, info))`` in file order, read and decoded in ``workers``
    processes (0: in this one) ahead of the caller, at least two batches of
    ``batch_size`` ahead; ``x`` is compact (:meth:`~tokenizers_vq.modality.Modality.load_compact`:
    uint8 pixels for images, a quarter of the bytes through the loader); the order and the
    values do not depend on the number of workers."""
    for f in files:
        if not isinstance(f, TarSample):  # tar samples are listed by the model's modality
            check_input_modality(tok, f)
    data = _Inputs(files, tok.modality, tok.sample_rate)
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
    for f, item in zip(files, items):
        if isinstance(item, Exception):  # a refused file (the reader's words) or a failed read
            raise item
        yield f, item


def _encode_batches(
    tok: Tokenizer, items: Iterator[tuple[Path, tuple[Tensor, list[int], dict]]], batch_size: int,
    precision: str = "fp32",
) -> Iterator[tuple[list[tuple[Path, list[int], dict[str, Any]]], Tensor | PackedCodes]]:
    """Encode read inputs (as :func:`_read` yields them) of equal shape together,
    ``batch_size`` at a time (expanded to model input on the model's device), every group
    encoded once ``items`` ends; at most
    ``2 * batch_size`` decoded inputs wait in memory (when that many are pending in groups
    of other shapes, all groups are encoded), plus one encoded batch held back until the
    next is queued. ``precision="bf16"``: under bf16 autocast.

    Yields:
        ``(chunk, encoded)``: ``(file, size, info)`` per file of the chunk and
        ``tok.encode`` of their stacked inputs.
    """
    device = next(tok.parameters()).device
    step = max(1, batch_size)
    pending: dict[tuple[int, ...], list[tuple[Path, Tensor, list[int], dict[str, Any]]]] = defaultdict(list)

    def encode(group: list[tuple[Path, Tensor, list[int], dict[str, Any]]]):
        x = tok.media.expand(torch.stack([x for _, x, _, _ in group]).to(device, non_blocking=True))
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                encoded = tok.encode(x)
        except ValueError as e:  # the tokenizer's refusal (e.g. too small), said of the files
            raise ValueError(f"{group[0][0] if len(group) == 1 else [str(f) for f, *_ in group]}: {e}") from e
        return [(f, size, info) for f, _, size, info in group], encoded

    def groups():
        for f, (x, size, info) in items:
            shape = tuple(x.shape)
            pending[shape].append((f, x, size, info))
            if len(pending[shape]) == step:
                yield pending.pop(shape)
            elif sum(map(len, pending.values())) >= 2 * step:
                for key in list(pending):
                    yield pending.pop(key)
        for key in list(pending):
            yield pending.pop(key)

    # one batch in flight: a batch is handed on (and copied back by the caller) only after
    # the next one is queued, so the copy back does not wait for the whole encode (the
    # encoder's own finiteness checks still wait for its forward pass)
    previous = None
    for group in groups():
        current = encode(group)
        if previous is not None:
            yield previous
        previous = current
    if previous is not None:
        yield previous


def _encode_shard(tok: Tokenizer, files: list[Path], items: Iterator, batch_size: int,
                  precision: str = "fp32") -> list[TokenRecord]:
    """Encode a shard's files (``items``: their read inputs, in order); inputs of equal
    shape (images of one size, audio of one length) are batched through the model
    together, at most ``batch_size`` at a time."""
    records = {}
    for chunk, codes in _encode_batches(tok, items, batch_size, precision):
        for (f, size, info), c in zip(chunk, codes.cpu()):
            records[f] = TokenRecord(c, f.name, size, info)
    return [records[f] for f in files]


# -- dynamic-length codes --------------------------------------------------------------------
def _encode_dynamic_shard(
    tok: Tokenizer, files: list[Path], items: Iterator, batch_size: int, precision: str = "fp32"
) -> list[tuple[TokenRecord, Tensor, list[int]]]:
    """Per file: record of its packed codes ``(N, *code_shape)``, layout rows ``(N, 2)``
    (cell raster index, granularity) and latent grid; media of equal shape are batched."""
    out = {}
    for chunk, packed in _encode_batches(tok, items, batch_size, precision):
        strides = torch.tensor([math.prod(packed.shape[a + 1 :]) for a in range(len(packed.shape))])
        for b, (f, size, info) in enumerate(chunk):
            codes, pos, fine = (t.cpu() for t in packed.sample(b))
            layout = torch.stack([(pos * strides).sum(-1), fine.long()], -1)
            out[f] = (TokenRecord(codes, f.name, size, info), layout, list(packed.shape))
    return [out[f] for f in files]


def default_batch_size(tok: Tokenizer) -> int:
    """Inputs encoded together when none is asked for: 1 on the CPU (one photo's
    activations stay in cache: twice the rate of 16 on two cores), 16 on an accelerator."""
    return 1 if next(tok.parameters()).device.type == "cpu" else 16


def default_workers(tok: Tokenizer) -> int:
    """Loader processes when none are asked for: none on the CPU (the model uses every core;
    reading in-process was faster on two), else the cores but one, up to 7."""
    return 0 if next(tok.parameters()).device.type == "cpu" else min(8, os.cpu_count() or 1) - 1


def export_dataset(
    tok: Tokenizer, files: list[Path], out_dir: str | os.PathLike, shard_items: int = 256, batch_size: int | None = None,
    overwrite: bool = False, workers: int | None = 0, precision: str = "fp32",
) -> dict[str, Any]:
    """Encode ``files`` into shards under ``out_dir``; resumes an interrupted export.
    A dynamic-length tokenizer (``tok.is_dynamic``) writes the ``"dynamic"`` layout.

    Args:
        batch_size: inputs of one shape encoded together; ``None``:
            :func:`default_batch_size`. The ids do not depend on it.
        workers: processes that read and decode the files while the model encodes
            (one ``DataLoader`` over all the shards this rank writes; 0: read in this
            process; ``None``: :func:`default_workers`). The shards do not depend on it.
        precision: ``"fp32"`` (default: the ids every machine gives) or ``"bf16"`` (the
            encoder under bf16 autocast: faster on a GPU; near-ties may take other ids).
            Recorded in ``export.json``: a resume must pass the same precision (it is refused
            otherwise, naming it). On the CPU it keeps freed memory in the process
            (:func:`~tokenizers_vq.runtime.keep_freed_memory`: 1.5x faster).
        overwrite: delete an earlier export in ``out_dir`` first (its shards, index
            files, manifest and ``export.json``; no other file) and start over.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: without ``overwrite``, ``out_dir`` holds an export whose
            ``export.json`` differs from this run's fingerprint
            (:func:`~tokenizers_vq.export_record.fingerprint`; the message names each
            differing field, recorded vs this run), or export files without an
            ``export.json``.
    """
    if shard_items < 1:
        raise ValueError(f"shard_items must be at least 1, got {shard_items}")
    batch_size = default_batch_size(tok) if batch_size is None else batch_size
    workers = default_workers(tok) if workers is None else workers
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: expected 'fp32' or 'bf16'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if next(tok.parameters()).device.type == "cpu":
        keep_freed_memory()
    q, dynamic = tok.quantizer, tok.is_dynamic
    if dynamic:
        tok._check_dynamic()
    files = [f if isinstance(f, TarSample) else Path(f) for f in files]
    dtype = token_dtype(q.codebook_size)
    layout = "dynamic" if dynamic else "grid"
    rank, world = distributed.rank_and_world()
    options = {"format": FORMAT, "shard_items": shard_items, "dtype": dtype.str, "layout": layout}
    if precision != "fp32":  # recorded when not the default, so older exports still resume
        options["precision"] = precision
    fp = fingerprint(tok, files, options)
    for turn in (0, 1):  # rank 0 claims (or clears) the folder, then the others check its record
        error = None
        if (rank == 0) == (turn == 0):
            try:
                claim(out, fp, overwrite and rank == 0)
            except (ValueError, OSError) as e:
                error = e
        distributed.agree(error)
    n_shards = (len(files) + shard_items - 1) // shard_items
    error = None
    try:
        todo = [k for k in range(rank, n_shards, world) if not _finished(out, k, dynamic)]
        chunks = {k: files[k * shard_items : (k + 1) * shard_items] for k in todo}
        reader = _read(tok, [f for k in todo for f in chunks[k]], workers, batch_size)  # one reader for them all
        for k in tqdm(todo, desc="export shards", disable=rank != 0):
            items = itertools.islice(reader, len(chunks[k]))  # this shard's inputs: batches never cross shards
            _write_shard(tok, out, k, chunks[k], items, dtype, batch_size, precision)
    except Exception as e:  # noqa: BLE001  (every rank learns of it, then it is raised)
        error = e
    finally:
        close_readers()
    distributed.agree(error)
    manifest = None
    if rank == 0:  # checks every shard and writes the manifest
        try:
            manifest = _finish(tok, out, files, shard_items, n_shards, dtype, layout)
        except Exception as e:  # noqa: BLE001  (as above)
            error = e
    distributed.agree(error)
    return manifest if rank == 0 else json.loads((out / "manifest.json").read_text())


def _finished(out: Path, k: int, dynamic: bool) -> bool:
    """Whether shard ``k`` was written (finished shards are kept)."""
    name = out / f"shard_{k:05d}"
    return all(Path(f"{name}{suffix}").is_file() for suffix in (".bin", ".json") + ((".layout.bin",) if dynamic else ()))


def _write_shard(tok: Tokenizer, out: Path, k: int, chunk: list[Path], items: Iterator, dtype: np.dtype,
                 batch_size: int, precision: str) -> None:
    """Encode shard ``k`` (files ``chunk``, ``items`` their read inputs); atomic writes."""
    dynamic = tok.is_dynamic
    name = f"shard_{k:05d}"
    bin_path, idx_path, layout_path = out / f"{name}.bin", out / f"{name}.json", out / f"{name}.layout.bin"
    if dynamic:
        encoded = _encode_dynamic_shard(tok, chunk, items, batch_size, precision)
    else:
        encoded = [(r, None, None) for r in _encode_shard(tok, chunk, items, batch_size, precision)]
    items, offset = [], 0
    for r, _, grid in encoded:
        n = r.codes.numel()
        items.append({"source": r.source, "offset": offset, "length": n, "shape": list(r.codes.shape),
                      "size": r.size, "info": r.info, **({"grid": grid} if dynamic else {})})
        offset += n
    if dynamic:
        rows = np.concatenate([lay.numpy().astype("<u4") for _, lay, _ in encoded])
        atomic_write(layout_path, lambda tmp, a=rows: a.tofile(tmp))
    flat = np.concatenate([r.codes.reshape(-1).numpy().astype(dtype) for r, _, _ in encoded])
    atomic_write(bin_path, lambda tmp, a=flat: a.tofile(tmp))
    atomic_write(idx_path, lambda tmp, it=items: Path(tmp).write_text(json.dumps({"items": it})))


def _finish(tok: Tokenizer, out: Path, files: list[Path], shard_items: int, n_shards: int, dtype: np.dtype,
            layout: str) -> dict[str, Any]:
    """Check every shard against its files and write the manifest (last)."""
    q, dynamic = tok.quantizer, tok.is_dynamic
    shards, items_per_shard, tokens_per_shard = [], [], []
    for k in range(n_shards):
        name = f"shard_{k:05d}"
        idx_path, chunk = out / f"{name}.json", files[k * shard_items : (k + 1) * shard_items]
        index = json.loads(idx_path.read_text())["items"]
        if [it["source"] for it in index] != [f.name for f in chunk]:
            raise ValueError(f"{idx_path} indexes other files than shard {k} of this export; {START_OVER}")
        try:
            tokens_per_shard.append(check_shard(out, name, index, dtype, math.prod(q.code_shape), dynamic))
        except ValueError as e:
            raise ValueError(f"{e}; {START_OVER}") from None
        items_per_shard.append(len(index))
        shards.append(name)
    manifest = {
        "format": FORMAT, "model_id": tok.config.name, "modality": tok.modality,
        "codebook_size": q.codebook_size, "code_shape": list(q.code_shape), "dtype": dtype.str,
        "layout": layout, "shards": shards, "num_items": sum(items_per_shard),
        "num_tokens": sum(tokens_per_shard), "items_per_shard": items_per_shard, "tokens_per_shard": tokens_per_shard,
    }
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return manifest
