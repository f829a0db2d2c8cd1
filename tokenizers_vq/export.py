"""Export a media folder to sharded token files an AR trainer can memory-map, and read
them back.

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
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from tokenizers_vq.export_record import START_OVER, claim, fingerprint
from tokenizers_vq.io import atomic_write
from tokenizers_vq.media import load_input
from tokenizers_vq.quantizers import PackedCodes
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import TokenRecord, encode_file

FORMAT = "tvq-shards/1"


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype("<u2") if codebook_size <= 2**16 else np.dtype("<u4")


def _encode_batches(
    tok: Tokenizer, files: list[Path], batch_size: int
) -> Iterator[tuple[list[tuple[Path, list[int], dict[str, Any]]], Tensor | PackedCodes]]:
    """Read every file (:func:`~tokenizers_vq.media.load_input`) and encode those whose
    inputs share a shape together, at most ``batch_size`` at a time.

    Yields:
        ``(chunk, encoded)``: ``(file, size, info)`` per file of the chunk and
        ``tok.encode`` of their stacked inputs.
    """
    inputs = {f: load_input(f, tok.modality, tok.sample_rate) for f in files}
    groups: dict[tuple[int, ...], list[Path]] = defaultdict(list)
    for f, (x, _, _) in inputs.items():
        groups[tuple(x.shape)].append(f)
    device = next(tok.parameters()).device
    step = max(1, batch_size)
    for group in groups.values():
        for i in range(0, len(group), step):
            chunk = group[i : i + step]
            encoded = tok.encode(torch.stack([inputs[f][0] for f in chunk]).to(device))
            yield [(f, *inputs[f][1:]) for f in chunk], encoded


def _encode_shard(tok: Tokenizer, files: list[Path], batch_size: int) -> list[TokenRecord]:
    """Encode files; images of equal size are batched through the model together
    (audio and video are read and encoded one file at a time)."""
    if tok.modality != "image" or batch_size <= 1:
        return [encode_file(tok, f) for f in files]
    records = {}
    for chunk, codes in _encode_batches(tok, files, batch_size):
        for (f, size, info), c in zip(chunk, codes.cpu()):
            records[f] = TokenRecord(c, f.name, size, info)
    return [records[f] for f in files]


# -- dynamic-length codes --------------------------------------------------------------------
def _encode_dynamic_shard(
    tok: Tokenizer, files: list[Path], batch_size: int
) -> list[tuple[TokenRecord, Tensor, list[int]]]:
    """Per file: record of its packed codes ``(N, *code_shape)``, layout rows ``(N, 2)``
    (cell raster index, granularity) and latent grid; media of equal shape are batched."""
    out = {}
    for chunk, packed in _encode_batches(tok, files, batch_size):
        strides = torch.tensor([math.prod(packed.shape[a + 1 :]) for a in range(len(packed.shape))])
        for b, (f, size, info) in enumerate(chunk):
            codes, pos, fine = (t.cpu() for t in packed.sample(b))
            layout = torch.stack([(pos * strides).sum(-1), fine.long()], -1)
            out[f] = (TokenRecord(codes, f.name, size, info), layout, list(packed.shape))
    return [out[f] for f in files]


def _check_shard(directory: Path, name: str, items: list[dict[str, Any]], dtype: np.dtype, per_cell: int,
                 dynamic: bool) -> int:
    """Tokens in shard ``name``, once its index and arrays agree: items back to back
    from offset 0, each ``length`` the product of its ``shape``, the ``.bin`` exactly
    that many tokens long (and a dynamic shard's ``.layout.bin`` one row per
    ``per_cell`` tokens).

    Raises:
        ValueError: naming the shard and what disagrees.
    """
    where = f"{directory}: shard {name}"
    offset = 0
    for j, it in enumerate(items):
        if it["offset"] != offset or it["length"] != math.prod(it["shape"]):
            raise ValueError(f"{where}: item {j} ({it['source']}) has offset {it['offset']} and length {it['length']} "
                             f"for shape {it['shape']}, expected offset {offset} and length {math.prod(it['shape'])}")
        offset += it["length"]
    arrays = {f"{name}.bin": (dtype.itemsize, offset, "tokens")}
    if dynamic:
        arrays[f"{name}.layout.bin"] = (8, offset // per_cell, "layout rows")
    for file, (itemsize, want, what) in arrays.items():
        path = directory / file
        if not path.is_file():
            raise ValueError(f"{where}: {file} is missing")
        have = path.stat().st_size / itemsize
        if have != want:
            raise ValueError(f"{where}: {file} holds {have:g} {what}, but {name}.json lists {want}")
    return offset


def export_dataset(
    tok: Tokenizer, files: list[Path], out_dir: str | os.PathLike, shard_items: int = 256, batch_size: int = 16,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Encode ``files`` into shards under ``out_dir``; resumes an interrupted export.
    A dynamic-length tokenizer (``tok.is_dynamic``) writes the ``"dynamic"`` layout.

    Args:
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    q, dynamic = tok.quantizer, tok.is_dynamic
    if dynamic:
        tok._check_dynamic()
    files = [Path(f) for f in files]
    dtype = token_dtype(q.codebook_size)
    layout = "dynamic" if dynamic else "grid"
    claim(out, fingerprint(tok, files, {"format": FORMAT, "shard_items": shard_items, "dtype": dtype.str,
                                        "layout": layout}), overwrite)
    n_shards = (len(files) + shard_items - 1) // shard_items
    shards, items_per_shard, tokens_per_shard = [], [], []
    for k in tqdm(range(n_shards), desc="export shards"):
        name = f"shard_{k:05d}"
        bin_path, idx_path = out / f"{name}.bin", out / f"{name}.json"
        layout_path = out / f"{name}.layout.bin"
        chunk = files[k * shard_items : (k + 1) * shard_items]
        finished = bin_path.is_file() and idx_path.is_file() and (not dynamic or layout_path.is_file())
        if not finished:  # finished shards are kept
            if dynamic:
                encoded = _encode_dynamic_shard(tok, chunk, batch_size)
            else:
                encoded = [(r, None, None) for r in _encode_shard(tok, chunk, batch_size)]
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
        index = json.loads(idx_path.read_text())["items"]
        if [it["source"] for it in index] != [f.name for f in chunk]:
            raise ValueError(f"{idx_path} indexes other files than shard {k} of this export; {START_OVER}")
        try:
            tokens_per_shard.append(_check_shard(out, name, index, dtype, math.prod(q.code_shape), dynamic))
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


class TokenDataset(Dataset):
    """Items of an export directory as token sequences, memory-mapped.

    Args:
        directory: an export directory (``manifest.json`` present).
        order: for codes with a level/group axis: ``"interleave"`` (all levels of
            one position, then the next position) or ``"flatten"`` (all positions
            of level 0, then level 1, ...).

    Each item is a dict: ``tokens`` (int64 ``(L,)``), ``positions`` (raster index of
    each token's latent cell), ``levels`` (its level/group index, 0 without one),
    ``shape`` (the stored code tensor's shape), ``source``, ``size``. Grids are in
    raster order. Dynamic-length items (``layout == "dynamic"``) are in coarse-to-fine
    order (all coarse tokens in region raster order, then the fine tokens region by
    region, whatever order the quantizer packed them in) and add ``granularity`` (0
    coarse: the token covers the 2/2x2/2x2x2 cells from ``positions``; 1 fine: that one
    cell) and ``grid`` (the latent shape); :meth:`to_packed` turns such a sequence back
    into :class:`PackedCodes` for ``Tokenizer.decode``.

    Raises:
        ValueError: not a finished export, or its manifest's counts (``num_items``,
            ``num_tokens``, per shard items and tokens), index files and token arrays
            disagree (the message names the shard).
    """

    def __init__(self, directory: str | os.PathLike, order: str = "interleave"):
        if order not in ("interleave", "flatten"):
            raise ValueError(f"order must be 'interleave' or 'flatten', got {order!r}")
        self.dir, self.order = Path(directory), order
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise ValueError(f"{self.dir} is not a finished export (no manifest.json)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} manifest")
        self.layout = self.manifest.get("layout", "grid")
        if self.layout not in ("grid", "dynamic"):
            raise ValueError(f"{path}: unknown layout {self.layout!r}")
        self.code_shape = tuple(self.manifest["code_shape"])
        self.per_cell = math.prod(self.code_shape)
        dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest["shards"]
        index = [self._index(s) for s in shards]
        self._check_counts(index, dtype)
        self.arrays = [np.memmap(self.dir / f"{s}.bin", dtype=dtype, mode="r") for s in shards]
        self.layouts = [np.memmap(self.dir / f"{s}.layout.bin", dtype="<u4", mode="r").reshape(-1, 2)
                        for s in shards] if self.layout == "dynamic" else []
        self.items = [(k, it) for k, items in enumerate(index) for it in items]

    def _index(self, shard: str) -> list[dict[str, Any]]:
        path = self.dir / f"{shard}.json"
        if not path.is_file():
            raise ValueError(f"{self.dir}: shard {shard}: {path.name} is missing")
        return json.loads(path.read_text())["items"]

    def _check_counts(self, index: list[list[dict[str, Any]]], dtype: np.dtype) -> None:
        """The manifest's counts against the index files, and those against the arrays."""
        m, fix = self.manifest, "; the export is inconsistent: export it again (tvq export --overwrite)"
        shards, tokens = m["shards"], []
        for key in ("items_per_shard", "tokens_per_shard"):  # absent from exports of older versions
            if key in m and len(m[key]) != len(shards):
                raise ValueError(f"{self.dir}: manifest lists {len(shards)} shards but {len(m[key])} {key}{fix}")
        for k, (s, items) in enumerate(zip(shards, index)):
            try:
                tokens.append(_check_shard(self.dir, s, items, dtype, self.per_cell, self.layout == "dynamic"))
            except ValueError as e:
                raise ValueError(f"{e}{fix}") from None
            counts = (("items_per_shard", len(items), "items"), ("tokens_per_shard", tokens[-1], "tokens"))
            for key, have, what in counts:
                if key in m and m[key][k] != have:
                    raise ValueError(f"{self.dir}: shard {s}: the manifest says {m[key][k]} {what}, "
                                     f"{s}.json and {s}.bin hold {have}{fix}")
        for key, have in (("num_items", sum(map(len, index))), ("num_tokens", sum(tokens))):
            if m[key] != have:
                raise ValueError(f"{self.dir}: the manifest says {key} {m[key]}, the shards hold {have} "
                                 f"(per shard: {[len(i) for i in index] if key == 'num_items' else tokens}){fix}")

    def __len__(self) -> int:
        return len(self.items)

    def codes(self, i: int) -> torch.Tensor:
        """The item's codes as stored: ``(*grid, *code_shape)``, or for dynamic items the
        packed tokens ``(N, *code_shape)`` in the quantizer's order."""
        k, it = self.items[i]
        flat = self.arrays[k][it["offset"] : it["offset"] + it["length"]]
        return torch.from_numpy(flat.astype(np.int64)).reshape(it["shape"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, it = self.items[i]
        codes = self.codes(i)
        rows = codes.reshape(-1, self.per_cell)  # one row per cell (grid) or packed token (dynamic)
        n = rows.shape[0]
        extra = {}
        if self.layout == "dynamic":
            r0 = it["offset"] // self.per_cell
            lay = torch.from_numpy(self.layouts[k][r0 : r0 + n].astype(np.int64))
            first = lay[:, 1].argsort(stable=True)  # coarse first; stable keeps region raster order
            rows, cell = rows[first], lay[first, 0]
            extra = {"granularity": self._spread(lay[first, 1]), "grid": it["grid"]}
        else:
            cell = torch.arange(n)
        lvl = torch.arange(self.per_cell).unsqueeze(0).expand(n, self.per_cell)
        return {"tokens": self._spread(rows), "positions": self._spread(cell), "levels": self._spread(lvl),
                "shape": list(codes.shape), "source": it["source"], "size": it["size"], **extra}

    def _spread(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n,)`` or ``(n, P)`` per-row values -> the ``(n * P,)`` sequence in ``order``."""
        if rows.ndim == 1:
            rows = rows.unsqueeze(1).expand(-1, self.per_cell)
        return (rows.t() if self.order == "flatten" else rows).reshape(-1)

    def to_packed(self, item: dict[str, Any]) -> PackedCodes:
        """:class:`PackedCodes` (one sample) of a dynamic item: ``tokens``,
        ``positions``, ``granularity`` in this dataset's ``order`` (as ``__getitem__``
        yields them, or generated in that layout) and ``grid``."""
        if self.layout != "dynamic":
            raise ValueError("to_packed takes items of a dynamic-length export (layout 'dynamic')")

        def rows(t: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(t).long()
            return t.reshape(self.per_cell, -1).t() if self.order == "flatten" else t.reshape(-1, self.per_cell)

        codes = rows(item["tokens"])
        grid = tuple(item["grid"])
        cell, fine = rows(item["positions"])[:, 0], rows(item["granularity"])[:, 0].bool()
        pos = torch.stack(torch.unravel_index(cell, grid), -1)
        return PackedCodes(codes.reshape(-1, *self.code_shape), pos, fine, torch.tensor([0, codes.shape[0]]), grid)

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the code distribution over the whole export."""
        counts = np.zeros(self.manifest["codebook_size"], dtype=np.int64)
        for a in self.arrays:
            counts += np.bincount(np.asarray(a), minlength=len(counts))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


class Vocabulary:
    """One id space for several code streams and special tokens.

    Ids ``[0, n_special)`` are the special tokens in the order given (default
    ``<pad>``, ``<bos>``, ``<eos>``); stream ``s`` (a codebook, a level, or a modality)
    takes ids ``[offset_s, offset_s + size_s)`` after them, in the order given.

    Example:
        >>> v = Vocabulary({"image": 1024, "audio": 4096})
        >>> v.encode("audio", torch.tensor([0, 5])), v.size
        (tensor([1027, 1032]), 5123)
        >>> v.decode(torch.tensor([1027]))
        ('audio', tensor([0]))
    """

    def __init__(self, streams: dict[str, int], special: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")):
        self.special = {name: i for i, name in enumerate(special)}
        self.offsets, self.sizes = {}, dict(streams)
        start = len(special)
        for name, size in streams.items():
            self.offsets[name] = start
            start += size
        self.size = start

    def encode(self, stream: str, codes: torch.Tensor) -> torch.Tensor:
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.sizes[stream]):
            raise ValueError(f"codes out of range for stream {stream!r} of size {self.sizes[stream]}")
        return codes + self.offsets[stream]

    def decode(self, ids: torch.Tensor) -> tuple[str, torch.Tensor]:
        """Stream name and codes of ids that all belong to one stream."""
        for name, off in self.offsets.items():
            if int(ids.min()) >= off and int(ids.max()) < off + self.sizes[name]:
                return name, ids - off
        raise ValueError("ids are special tokens or span several streams")
