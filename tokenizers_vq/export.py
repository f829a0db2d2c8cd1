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

Shard ``k`` always holds files ``[k*S, (k+1)*S)`` of the file list, in the order given
(``tvq export`` sorts a folder's files by path), and each
shard is written atomically (``.bin`` then ``.json``), so an interrupted export
resumes by skipping finished shards and never leaves a half-written one. A rerun
resumes only when its fingerprint equals the recorded ``export.json``; otherwise it
is refused, naming what differs, unless ``overwrite=True`` (``tvq export
--overwrite``), which sets the files an export writes (and no others) aside until the new
export finishes.

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
import numbers
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from tokenizers_vq import distributed
from tokenizers_vq.export_pipeline import FLUSH, encode_batches, read_inputs
from tokenizers_vq.export_record import (
    IMAGE_READER,
    REPLACED,
    START_OVER,
    UPRIGHT,
    bring_back,
    claim,
    drop_replaced,
    fingerprint,
)
from tokenizers_vq.errors import named_path
from tokenizers_vq.io import atomic_write, check_can_write, write_bytes
from tokenizers_vq.media import MAX_PIXELS
from tokenizers_vq.modality import get as get_modality
from tokenizers_vq.runtime import keep_freed_memory
from tokenizers_vq.token_dataset import FORMAT, TokenDataset, Vocabulary, check_shard, read_index, token_dtype  # noqa: F401
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import TokenRecord
from tokenizers_vq.webdataset import TarSample, close_readers


def _with_flushes(reader: Iterator, sizes: list[int]) -> Iterator:
    """The reader's inputs shard by shard, each shard's followed by :data:`FLUSH`: batches never
    cross shards (a resumed export batches every shard as an uninterrupted one), while the
    encode runs on from one shard into the next."""
    for n in sizes:
        yield from itertools.islice(reader, n)
        yield FLUSH


def _shard_batches(files: list[Path], batches: Iterator) -> Iterator:
    """The encoded batches (``(chunk, encoded)``) of one shard's ``files``, taken from ``batches``."""
    left, mine = len(files), set(files)
    while left > 0:
        batch = next(batches, None)
        if batch is None or not all(f in mine for f, _, _ in batch[0]):  # a bug, never a wrong shard
            raise RuntimeError(f"export: the encoded batches and the shard of {files[0]} are out of step")
        left -= len(batch[0])
        yield batch


def _encode_shard(files: list[Path], batches: Iterator) -> list[TokenRecord]:
    """A shard's records in file order (inputs of equal shape were batched together)."""
    records = {}
    for chunk, codes in _shard_batches(files, batches):
        for (f, size, info), c in zip(chunk, codes.cpu()):
            records[f] = TokenRecord(c, f.name, size, info)
    return [records[f] for f in files]


# -- dynamic-length codes --------------------------------------------------------------------
def _encode_dynamic_shard(files: list[Path], batches: Iterator) -> list[tuple[TokenRecord, Tensor, list[int]]]:
    """Per file: record of its packed codes ``(N, *code_shape)``, layout rows ``(N, 2)``
    (cell raster index, granularity) and latent grid; media of equal shape are batched."""
    out = {}
    for chunk, packed in _shard_batches(files, batches):
        strides = torch.tensor([math.prod(packed.shape[a + 1 :]) for a in range(len(packed.shape))])
        for b, (f, size, info) in enumerate(chunk):
            codes, pos, fine = (t.cpu() for t in packed.sample(b))
            layout = torch.stack([(pos * strides).sum(-1), fine.long()], -1)
            out[f] = (TokenRecord(codes, f.name, size, info), layout, list(packed.shape))
    return [out[f] for f in files]


def default_batch_size(tok: Tokenizer, fit: tuple[int, bool] | None = None) -> int:
    """Inputs encoded together when none is asked for: 16 on an accelerator; on the CPU 1
    (one photo's activations stay in cache: twice the rate of 16 on two cores), or for
    photos cut to one square (``fit``: ``(resize, center_crop)``) as many as make
    256 x 256 x 4 pixels (4 at 256 x 256: 10% faster in bf16 and 4% in fp32 than 1 on two cores)."""
    if next(tok.parameters()).device.type != "cpu":
        return 16
    return max(1, 4 * 256 * 256 // fit[0] ** 2) if fit and fit[1] else 1


def default_workers(tok: Tokenizer) -> int:
    """Loader processes when none are asked for: none on the CPU (the model uses every core;
    reading in-process was faster on two), else the cores this process may run on but one,
    up to 15: its CPU affinity (a cpuset limit), not the host's core count, since more
    loaders than cores starve the process that feeds the GPU. A CPU quota that is not an
    affinity (``docker --cpus``) is not seen: pass ``workers`` there. On an H200 seven
    loaders decoded photos barely faster than the model encoded them (1,423 vs 1,115-1,273
    per second); fifteen left headroom (2,398)."""
    if next(tok.parameters()).device.type == "cpu":
        return 0
    return min(16, usable_cores()) - 1


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def export_dataset(
    tok: Tokenizer, files: list[Path], out_dir: str | os.PathLike, shard_items: int = 256, batch_size: int | None = None,
    overwrite: bool = False, workers: int | None = 0, precision: str = "fp32", root: str | os.PathLike | None = None,
    resize: int | None = None, center_crop: bool = False,
) -> dict[str, Any]:
    """Encode ``files`` into shards under ``out_dir``; resumes an interrupted export.
    A dynamic-length tokenizer (``tok.is_dynamic``) writes the ``"dynamic"`` layout.

    Args:
        batch_size: inputs of one shape encoded together; ``None``:
            :func:`default_batch_size`. In fp32 on the CPU the ids do not depend on it (the
            tokenizer codes each item alone; a dynamic-length one codes a batch whole).
        workers: processes that read and decode the files while the model encodes
            (one ``DataLoader`` over all the shards this rank writes; 0: read in this
            process; ``None``: :func:`default_workers`). The shards do not depend on it.
        precision: ``"fp32"`` (default: the reference ids, for images the same for any
            CPU thread count; another instruction set or a GPU can flip a near-tie, and so can
            the thread count for speech, whose fp32 convolutions split sums by thread) or
            ``"bf16"`` (the encoder under bf16 autocast: faster on a GPU, 3x on a CPU with bf16 units;
            near-ties may take other ids, varying with threads and, for speech and video, batch size).
            Recorded in ``export.json``: a resume must pass the same precision (it is refused
            otherwise, naming it). On the CPU it keeps freed memory in the process
            (:func:`~tokenizers_vq.runtime.keep_freed_memory`: 1.5x faster).
        overwrite: start over: an earlier export in ``out_dir`` (its shards, index files,
            manifest and ``export.json``; no other file) is set aside in ``out_dir/.replaced``,
            deleted once this one finishes and put back if it fails (an interrupt keeps both:
            this one resumes when run again, and a finished earlier export's own run, without
            ``overwrite``, puts it back).
        root: the folder each item's ``path`` in the index is relative to (``tvq export``:
            ``--data``); ``None``: the folder that holds every file. A tar sample's ``path``
            is its member's path in the archive.
        resize: images: each photo resized so that its shorter side is this many pixels
            (:func:`~tokenizers_vq.image_io.fit_image`; ``None``: coded at its own size);
            every item's ``size`` in the index is the size it was coded at. Recorded as
            ``image_fit`` in ``export.json`` (with Pillow's version) and ``manifest.json``.
        center_crop: with ``resize``, each resized photo cut to its central
            ``resize x resize``, so that every item has the same shape.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: ``files`` is empty; without ``overwrite``, ``out_dir`` holds an export whose
            ``export.json`` differs from this run's fingerprint
            (:func:`~tokenizers_vq.export_record.fingerprint`; the message names each
            differing field, recorded vs this run), or export files without an
            ``export.json``.
    """
    if shard_items < 1:
        raise ValueError(f"shard_items must be at least 1, got {shard_items}")
    workers = default_workers(tok) if workers is None else workers
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: expected 'fp32' or 'bf16'")
    fit = _check_fit(tok, resize, center_crop)
    if batch_size is None:
        batch_size = default_batch_size(tok, fit)
    out = named_path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: an export is written into a folder; name a folder (--out)")
    q, dynamic = tok.quantizer, tok.is_dynamic
    if dynamic:
        tok._check_dynamic()
    files = list(files)
    if not files:  # a finished export of nothing would open as an empty dataset
        raise ValueError(f"no files to export into {out}: give at least one {tok.modality} file "
                         f"(tokenizers_vq.media.list_media(folder, {tok.modality!r}) lists a folder's)")
    check_can_write(out / "manifest.json")  # a folder that cannot be made or written is named, as writes are
    out.mkdir(parents=True, exist_ok=True)
    if next(tok.parameters()).device.type == "cpu":
        keep_freed_memory()
    files = [f if isinstance(f, TarSample) else Path(f) for f in files]
    dtype = token_dtype(q.codebook_size)
    layout = "dynamic" if dynamic else "grid"
    rank, world = distributed.rank_and_world()
    options = {"format": FORMAT, "shard_items": shard_items, "dtype": dtype.str, "layout": layout}
    if precision != "fp32":  # recorded when not the default, so older exports still resume
        options["precision"] = precision
    if tok.modality in ("image", "video"):
        options[f"{tok.modality}_reader"] = IMAGE_READER if tok.modality == "image" else UPRIGHT
    if fit:  # recorded when set, so older exports still resume; another Pillow may resample otherwise
        options["image_fit"] = {"resize": fit[0], "center_crop": fit[1], "pillow": _pillow_version()}
    fp = error = None
    try:  # an input one rank cannot stat stops every rank
        fp = fingerprint(tok, files, options)
    except Exception as e:  # noqa: BLE001  (raised below on every rank)
        error = e
    distributed.agree(error)
    for turn in (0, 1):  # rank 0 claims (or clears) the folder, then the others check its record
        error = None
        if (rank == 0) == (turn == 0):
            try:
                claim(out, fp, overwrite and rank == 0, tok)
            except Exception as e:  # noqa: BLE001  (raised below on every rank)
                error = e
        try:
            distributed.agree(error)
        except Exception:  # another rank refused the record rank 0 wrote: the replaced export is put back
            if turn == 1 and overwrite and rank == 0:
                bring_back(out)
            raise
    try:
        folders = [os.path.abspath(f.parent) for f in files if isinstance(f, Path)]
        base = os.path.abspath(root) if root is not None else os.path.commonpath(folders) if folders else None
        manifest = _export_claimed(tok, files, out, shard_items, batch_size, workers, precision, dtype, layout, base, fit)
    except Exception:  # raised on every rank, once all stopped (distributed.agree): the replaced export is put
        # back. An interrupt keeps both: the new run resumes when run again, the old one stays in .replaced
        if overwrite and rank == 0:
            bring_back(out)
        raise
    except KeyboardInterrupt as e:
        kept = out / REPLACED
        if overwrite and kept.is_dir():  # the earlier command puts back a finished export only
            finished = (kept / "manifest.json").is_file()
            back = ", or the earlier one (without --overwrite) to put that export back" if finished else ""
            raise KeyboardInterrupt(f"the {'' if finished else 'unfinished '}export this one replaces is kept in {kept} "
                                    f"until it finishes: run the same command again to finish it{back}") from e
        raise
    if rank == 0:
        drop_replaced(out)
    return manifest


def _check_fit(tok: Tokenizer, resize: int | None, center_crop: bool) -> tuple[int, bool] | None:
    """``(resize, center_crop)`` for :func:`~tokenizers_vq.image_io.fit_image`, or ``None``; refused in words
    where it cannot apply."""
    if (resize is not None or center_crop) and tok.modality != "image":
        raise ValueError(f"resize applies to photos, but model {tok.config.name!r} is {get_modality(tok.modality).article} "
                         "tokenizer: leave out --resize and --center-crop")
    if resize is None:
        if center_crop:
            raise ValueError("center_crop cuts a square of the resize side: give resize too (tvq export --resize 256 "
                             "--center-crop)")
        return None
    if isinstance(resize, bool) or not isinstance(resize, numbers.Integral) or not 8 <= resize <= math.isqrt(MAX_PIXELS):
        raise ValueError(f"resize={resize!r}: expected a whole number of pixels from 8 to {math.isqrt(MAX_PIXELS)} (the "
                         "shorter side after resizing)")
    return int(resize), bool(center_crop)


def _pillow_version() -> str:
    import PIL  # noqa: PLC0415 (keep import cheap)

    return PIL.__version__


def _export_claimed(tok: Tokenizer, files: list, out: Path, shard_items: int, batch_size: int, workers: int,
                    precision: str, dtype: np.dtype, layout: str, root: str | None,
                    fit: tuple[int, bool] | None = None) -> dict[str, Any]:
    """:func:`export_dataset` once ``out`` is claimed: this rank's shards, then the manifest."""
    dynamic = tok.is_dynamic
    rank, world = distributed.rank_and_world()
    n_shards = (len(files) + shard_items - 1) // shard_items
    error = reader = batches = None
    try:
        todo = [k for k in range(rank, n_shards, world) if not _finished(out, k, dynamic)]
        chunks = {k: files[k * shard_items : (k + 1) * shard_items] for k in todo}
        reader = read_inputs(tok, [f for k in todo for f in chunks[k]], workers, batch_size, fit)  # one reader for all
        batches = encode_batches(tok, _with_flushes(reader, [len(chunks[k]) for k in todo]), batch_size, precision)
        with tqdm(todo, desc="export shards", disable=rank != 0) as bar:  # its line ended if a shard fails
            for k in bar:
                _write_shard(tok, out, k, chunks[k], batches, dtype, root)
    except Exception as e:  # noqa: BLE001  (every rank learns of it, then it is raised)
        error = e
    finally:
        for it in (batches, reader):  # loader workers and batches in flight end now, not with the traceback
            if it is not None:
                it.close()
        close_readers()
    distributed.agree(error)
    manifest = None
    if rank == 0:  # checks every shard and writes the manifest
        try:
            manifest = _finish(tok, out, files, shard_items, n_shards, dtype, layout, fit)
        except Exception as e:  # noqa: BLE001  (as above)
            error = e
    distributed.agree(error)
    return manifest if rank == 0 else json.loads((out / "manifest.json").read_text())


def _finished(out: Path, k: int, dynamic: bool) -> bool:
    """Whether shard ``k`` was written (finished shards are kept)."""
    name = out / f"shard_{k:05d}"
    return all(Path(f"{name}{suffix}").is_file() for suffix in (".bin", ".json") + ((".layout.bin",) if dynamic else ()))


def _write_shard(tok: Tokenizer, out: Path, k: int, chunk: list[Path], batches: Iterator, dtype: np.dtype,
                 root: str | None) -> None:
    """Write shard ``k`` (files ``chunk``; their encoded batches come next in ``batches``); atomic writes.
    Each item's ``path``: relative to ``root`` (``/``-separated), a tar sample's member path."""
    dynamic = tok.is_dynamic
    name = f"shard_{k:05d}"
    bin_path, idx_path, layout_path = out / f"{name}.bin", out / f"{name}.json", out / f"{name}.layout.bin"
    if dynamic:
        encoded = _encode_dynamic_shard(chunk, batches)
    else:
        encoded = [(r, None, None) for r in _encode_shard(chunk, batches)]
    items, offset = [], 0
    for f, (r, _, grid) in zip(chunk, encoded):
        n = r.codes.numel()
        path = Path(os.path.relpath(os.path.abspath(f), root)).as_posix() if isinstance(f, Path) else f.member
        items.append({"source": r.source, "path": path, "offset": offset, "length": n, "shape": list(r.codes.shape),
                      "size": r.size, "info": r.info, **({"grid": grid} if dynamic else {})})
        offset += n
    if dynamic:
        rows = np.concatenate([lay.numpy().astype("<u4") for _, lay, _ in encoded])
        atomic_write(layout_path, lambda tmp, a=rows: write_bytes(a, tmp))
    flat = np.concatenate([r.codes.reshape(-1).numpy().astype(dtype) for r, _, _ in encoded])
    atomic_write(bin_path, lambda tmp, a=flat: write_bytes(a, tmp))
    atomic_write(idx_path, lambda tmp, it=items: Path(tmp).write_text(json.dumps({"items": it})))


def _finish(tok: Tokenizer, out: Path, files: list[Path], shard_items: int, n_shards: int, dtype: np.dtype,
            layout: str, fit: tuple[int, bool] | None = None) -> dict[str, Any]:
    """Check every shard against its files and write the manifest (last)."""
    q, dynamic = tok.quantizer, tok.is_dynamic
    shards, items_per_shard, tokens_per_shard = [], [], []
    for k in range(n_shards):
        name = f"shard_{k:05d}"
        idx_path, chunk = out / f"{name}.json", files[k * shard_items : (k + 1) * shard_items]
        again = (f"delete {out / name}.* to have that shard encoded again by the next run (the others are kept), "
                 f"or {START_OVER}")
        try:
            index = read_index(idx_path, dynamic)
            if [it["source"] for it in index] != [f.name for f in chunk]:
                raise ValueError(f"{idx_path} indexes other files than shard {k} of this export")
            tokens_per_shard.append(check_shard(out, name, index, dtype, math.prod(q.code_shape), dynamic))
        except ValueError as e:
            raise ValueError(f"{e}; {again}") from None
        items_per_shard.append(len(index))
        shards.append(name)
    manifest = {
        "format": FORMAT, "model_id": tok.config.name, "modality": tok.modality,
        "codebook_size": q.codebook_size, "code_shape": list(q.code_shape), "dtype": dtype.str,
        "layout": layout, "shards": shards, "num_items": sum(items_per_shard),
        "num_tokens": sum(tokens_per_shard), "items_per_shard": items_per_shard, "tokens_per_shard": tokens_per_shard,
        **({"image_fit": {"resize": fit[0], "center_crop": fit[1]}} if fit else {}),
    }
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return manifest
