"""Reading an export directory (``tvq-shards/1``, written by
:func:`tokenizers_vq.export.export_dataset`; the layout is described there): memory-mapped
token sequences for an AR trainer, and a joint vocabulary over several token streams."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tokenizers_vq.quantizers import PackedCodes

FORMAT = "tvq-shards/1"


def _whole(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype("<u2") if codebook_size <= 2**16 else np.dtype("<u4")


def check_shard(directory: Path, name: str, items: list[dict[str, Any]], dtype: np.dtype, per_cell: int,
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


def read_index(path: Path, dynamic: bool) -> list[dict[str, Any]]:
    """A shard's index items, each checked to hold its fields, of their kinds.

    Raises:
        ValueError: unreadable, or an item that lacks a field (the message names the file and item).
    """
    items = read_json(path, "items")["items"]
    fields = {"offset": int, "length": int, "shape": list, "source": str, "size": list}
    fields.update({"grid": list} if dynamic else {})
    for j, it in enumerate(items if isinstance(items, list) else [None]):
        bad = [k for k, kind in fields.items() if not isinstance(it, dict) or not isinstance(it.get(k), kind)
               or (kind is list and not all(_whole(n) for n in it[k]))]
        if not bad and not isinstance(it.get("info", {}), dict):
            bad = ["info"]
        if bad:
            raise ValueError(f"corrupt {path}: item {j} has no valid {', '.join(bad)} (an object with offset and "
                             "length whole numbers, source a string, shape and size lists of whole numbers, info "
                             "an object if present)")
    return items


def read_json(path: Path, key: str) -> dict[str, Any]:
    """An export's JSON object (manifest, shard index) holding ``key``.

    Raises:
        ValueError: unreadable JSON, or not an object with ``key`` (the message names the file).
    """
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt {path}: {e}") from None
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"corrupt {path}: not a JSON object with {key!r}")
    return data


class TokenDataset(Dataset):
    """Items of an export directory as token sequences, memory-mapped.

    Args:
        directory: an export directory (``manifest.json`` present).
        order: for codes with a level/group axis: ``"interleave"`` (all levels of
            one position, then the next position) or ``"flatten"`` (all positions
            of level 0, then level 1, ...).

    Each item is a dict: ``tokens`` (int64 ``(L,)``), ``positions`` (raster index of
    each token's latent cell), ``levels`` (its level/group index, 0 without one),
    ``shape`` (the stored code tensor's shape), ``source``, ``size`` and ``info`` (what the
    export recorded of the input: a tar sample's ``key``, a video's ``fps`` and
    ``pixel_aspect`` where pixels are not square, audio's ``sample_rate`` and ``source_sample_rate``;
    ``{}`` when none: its keys vary by item, so a ``DataLoader`` batches items with a ``collate_fn``
    of its own, as their lengths vary too). Grids are in
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
        self.manifest = read_json(path, "shards")
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} manifest")
        m = self.manifest
        missing = [k for k in ("modality", "codebook_size", "code_shape", "dtype", "num_items", "num_tokens", "shards")
                   if k not in m]
        if missing:
            raise ValueError(f"corrupt {path}: it lacks {', '.join(missing)}; export it again (tvq export --overwrite)")
        counts = [k for k in ("codebook_size", "num_items", "num_tokens") if not _whole(m[k])]
        counts += [k for k in ("items_per_shard", "tokens_per_shard")
                   if k in m and not (isinstance(m[k], list) and all(map(_whole, m[k])))]
        if counts:
            raise ValueError(f"corrupt {path}: {', '.join(counts)} must be whole numbers >= 0 (lists of them per "
                             "shard); export it again (tvq export --overwrite)")
        self.layout = self.manifest.get("layout", "grid")
        if self.layout not in ("grid", "dynamic"):
            raise ValueError(f"{path}: unknown layout {self.layout!r}")
        shards, fix = self.manifest["shards"], "export it again (tvq export --overwrite)"
        try:
            self.code_shape = tuple(int(n) for n in self.manifest["code_shape"])
            dtype = np.dtype(self.manifest["dtype"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupt {path}: code_shape {self.manifest['code_shape']!r} or dtype "
                             f"{self.manifest['dtype']!r} unreadable ({e}); {fix}") from None
        if not (isinstance(shards, list) and all(isinstance(n, str) for n in shards)) or \
                dtype not in (np.dtype("<u2"), np.dtype("<u4")) or not isinstance(self.manifest["code_shape"], list) \
                or not all(n >= 1 for n in self.code_shape):
            raise ValueError(f"corrupt {path}: shards must be a list of names, dtype <u2 or <u4 (little-endian, as "
                             f"tvq export writes) and code_shape a list of whole numbers >= 1; {fix}")
        self.per_cell = math.prod(self.code_shape)
        index = [self._index(s) for s in shards]
        self._check_counts(index, dtype)
        self.arrays = [np.memmap(self.dir / f"{s}.bin", dtype=dtype, mode="r") for s in shards]
        self.layouts = [np.memmap(self.dir / f"{s}.layout.bin", dtype="<u4", mode="r").reshape(-1, 2)
                        for s in shards] if self.layout == "dynamic" else []
        self.items = [(k, it) for k, items in enumerate(index) for it in items]

    def __reduce__(self):
        # a DataLoader worker started by spawn or forkserver maps the files again (pickling the
        # memory maps would copy every token into each worker)
        return type(self), (self.dir, self.order)

    def _index(self, shard: str) -> list[dict[str, Any]]:
        path = self.dir / f"{shard}.json"
        if not path.is_file():
            raise ValueError(f"{self.dir}: shard {shard}: {path.name} is missing")
        try:
            return read_index(path, self.layout == "dynamic")
        except ValueError as e:
            raise ValueError(f"{e}; delete {shard}.* there and run the export again to encode it again") from None

    def _check_counts(self, index: list[list[dict[str, Any]]], dtype: np.dtype) -> None:
        """The manifest's counts against the index files, and those against the arrays."""
        m, fix = self.manifest, "; the export is inconsistent: export it again (tvq export --overwrite)"
        shards, tokens = m["shards"], []
        for key in ("items_per_shard", "tokens_per_shard"):  # absent from exports of older versions
            if key in m and len(m[key]) != len(shards):
                raise ValueError(f"{self.dir}: manifest lists {len(shards)} shards but {len(m[key])} {key}{fix}")
        cs = list(self.code_shape)
        for k, (s, items) in enumerate(zip(shards, index)):
            for j, it in enumerate(items):  # (*grid, *code_shape), or (N, *code_shape) packed
                if len(it["shape"]) <= len(cs) or it["shape"][len(it["shape"]) - len(cs):] != cs:
                    raise ValueError(f"{self.dir}: shard {s}: item {j} ({it['source']}) has shape {it['shape']}, which "
                                     f"does not end in the manifest's code_shape {cs} after a grid{fix}")
            try:
                tokens.append(check_shard(self.dir, s, items, dtype, self.per_cell, self.layout == "dynamic"))
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
        if flat.size and int(flat.max()) >= self.manifest["codebook_size"]:
            raise self._damaged(k, int(flat.max()), f": item {it['source']}")
        return torch.from_numpy(flat.astype(np.int64)).reshape(it["shape"])

    def check_tokens(self) -> None:
        """Refuse a shard holding a token past the codebook (damaged), naming it: one pass over
        every shard, for a reader that would otherwise index past a table mid-run."""
        for k, a in enumerate(self.arrays):
            if a.size and int(a.max()) >= self.manifest["codebook_size"]:
                raise self._damaged(k, int(a.max()))

    def _damaged(self, k: int, token: int, where: str = "") -> ValueError:
        shard = self.manifest["shards"][k]
        return ValueError(f"{self.dir / shard}.bin{where} holds token {token}, past the codebook's "
                          f"{self.manifest['codebook_size']} codes: the shard is damaged; delete {shard}.* there "
                          "and run the export again to encode it again")

    def __getitem__(self, i: int) -> dict[str, Any]:
        if isinstance(i, slice):
            raise TypeError(f"TokenDataset takes one item's index, not a slice: [ds[j] for j in range(len(ds))[{i.start}:"
                            f"{i.stop}:{i.step}]]")
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
                "shape": list(codes.shape), "source": it["source"], "size": it["size"], "info": dict(it.get("info", {})),
                **({"path": it["path"]} if "path" in it else {}), **extra}

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
        for k, a in enumerate(self.arrays):
            found = np.bincount(np.asarray(a), minlength=len(counts))
            if len(found) > len(counts):
                raise self._damaged(k, len(found) - 1)
            counts += found
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
        bad = {k: n for k, n in dict(streams).items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
        if bad:
            raise ValueError(f"stream sizes must be positive whole numbers, got {bad}")
        if len(set(special)) != len(special) or set(special) & set(streams):
            raise ValueError(f"special tokens and stream names must each be given once, got special tokens "
                             f"{list(special)} and streams {list(streams)}")
        self.special = {name: i for i, name in enumerate(special)}
        self.offsets, self.sizes = {}, dict(streams)
        start = len(special)
        for name, size in streams.items():
            self.offsets[name] = start
            start += size
        self.size = start

    def encode(self, stream: str, codes: torch.Tensor) -> torch.Tensor:
        """Ids (int64) of ``codes`` of ``stream``, any integer dtype (a shard's uint16 included)."""
        if stream not in self.sizes:
            raise ValueError(f"unknown stream {stream!r}; this vocabulary's streams are {list(self.sizes)}")
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"codes must be a torch tensor, got {type(codes).__name__} (torch.as_tensor(codes))")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes of stream {stream!r} must be integers, got {codes.dtype}")
        codes = codes.long()  # (a uint64 past int64 wraps below 0: refused below)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.sizes[stream]):
            raise ValueError(f"codes out of range for stream {stream!r} of size {self.sizes[stream]}")
        return codes + self.offsets[stream]

    def decode(self, ids: torch.Tensor) -> tuple[str, torch.Tensor]:
        """Stream name and codes of ids that all belong to one stream."""
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"ids must be a torch tensor, got {type(ids).__name__} (torch.as_tensor(ids))")
        if ids.numel() == 0:
            raise ValueError("no ids to decode: an empty tensor belongs to no stream")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        for name, off in self.offsets.items():
            if int(ids.min()) >= off and int(ids.max()) < off + self.sizes[name]:
                return name, ids - off
        raise ValueError("ids are special tokens or span several streams")
