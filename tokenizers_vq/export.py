"""Export a media folder to sharded token files an AR trainer can memory-map, and read
them back.

Layout of an export directory (``tvq-shards/1``):

- ``shard_00000.bin`` ...: one flat little-endian array per shard (``uint16`` when the
  codebook has at most 65536 codes, else ``uint32``): the items' codes one after the
  other, each in C order of its shape ``(*grid, *code_shape)``.
- ``shard_00000.json`` ...: that shard's index: per item ``source``, ``offset`` and
  ``length`` (in tokens), ``shape``, original ``size`` and ``info``.
- ``manifest.json`` (written last): ``format``, ``model_id``, ``modality``,
  ``codebook_size``, ``code_shape``, ``dtype``, ``shards``, ``num_items``, ``num_tokens``.

Shard ``k`` always holds files ``[k*S, (k+1)*S)`` of the sorted file list, and each
shard is written atomically (``.bin`` then ``.json``), so an interrupted export
resumes by skipping finished shards and never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from tokenizers_vq.io import atomic_write
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import TokenRecord, encode_file

FORMAT = "tvq-shards/1"


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype("<u2") if codebook_size <= 2**16 else np.dtype("<u4")


def _encode_shard(tok: Tokenizer, files: list[Path], batch_size: int) -> list[TokenRecord]:
    """Encode files; images of equal size are batched through the model together."""
    if tok.modality != "image" or batch_size <= 1:
        return [encode_file(tok, f) for f in files]
    from tokenizers_vq.io import load_image  # noqa: PLC0415

    images = {f: load_image(f) for f in files}
    groups: dict[tuple[int, ...], list[Path]] = defaultdict(list)
    for f, img in images.items():
        groups[tuple(img.shape)].append(f)
    device = next(tok.parameters()).device
    records = {}
    for shape, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = torch.stack([images[f] for f in chunk]).to(device) * 2 - 1
            for f, codes in zip(chunk, tok.encode(x).cpu()):
                records[f] = TokenRecord(codes, f.name, list(shape[1:]), {"channels": 3})
    return [records[f] for f in files]


def export_dataset(
    tok: Tokenizer, files: list[Path], out_dir: str | os.PathLike, shard_items: int = 256, batch_size: int = 16
) -> dict[str, Any]:
    """Encode ``files`` into shards under ``out_dir``; resumes an interrupted export.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    q = tok.quantizer
    dtype = token_dtype(q.codebook_size)
    n_shards = (len(files) + shard_items - 1) // shard_items
    shards, n_tokens = [], 0
    for k in tqdm(range(n_shards), desc="export shards"):
        name = f"shard_{k:05d}"
        bin_path, idx_path = out / f"{name}.bin", out / f"{name}.json"
        if not (bin_path.is_file() and idx_path.is_file()):  # finished shards are kept
            records = _encode_shard(tok, files[k * shard_items : (k + 1) * shard_items], batch_size)
            items, offset = [], 0
            for r in records:
                n = r.codes.numel()
                items.append({"source": r.source, "offset": offset, "length": n, "shape": list(r.codes.shape),
                              "size": r.size, "info": r.info})
                offset += n
            flat = np.concatenate([r.codes.reshape(-1).numpy().astype(dtype) for r in records])
            atomic_write(bin_path, lambda tmp, a=flat: a.tofile(tmp))
            atomic_write(idx_path, lambda tmp, it=items: Path(tmp).write_text(json.dumps({"items": it})))
        index = json.loads(idx_path.read_text())
        n_tokens += sum(it["length"] for it in index["items"])
        shards.append(name)
    manifest = {
        "format": FORMAT, "model_id": tok.config.name, "modality": tok.modality,
        "codebook_size": q.codebook_size, "code_shape": list(q.code_shape), "dtype": dtype.str,
        "shards": shards, "num_items": len(files), "num_tokens": n_tokens,
    }
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return manifest


class TokenDataset(Dataset):
    """Items of an export directory as token sequences, memory-mapped.

    Args:
        directory: an export directory (``manifest.json`` present).
        order: for codes with a level/group axis: ``"interleave"`` (all levels of
            one position, then the next position) or ``"flatten"`` (all positions
            of level 0, then level 1, ...). Grids are in raster order.

    Each item is a dict: ``tokens`` (int64 ``(L,)``), ``positions`` (raster index of
    each token's grid cell), ``levels`` (its level/group index, 0 without one),
    ``shape`` (the code tensor's shape), ``source``, ``size``.
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
        dtype = np.dtype(self.manifest["dtype"])
        self.arrays = [np.memmap(self.dir / f"{s}.bin", dtype=dtype, mode="r") for s in self.manifest["shards"]]
        self.items = [(k, it) for k, s in enumerate(self.manifest["shards"])
                      for it in json.loads((self.dir / f"{s}.json").read_text())["items"]]

    def __len__(self) -> int:
        return len(self.items)

    def codes(self, i: int) -> torch.Tensor:
        """The item's codes in their original shape ``(*grid, *code_shape)``."""
        k, it = self.items[i]
        flat = self.arrays[k][it["offset"] : it["offset"] + it["length"]]
        return torch.from_numpy(flat.astype(np.int64)).reshape(it["shape"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        _, it = self.items[i]
        codes = self.codes(i)
        n_code_axes = len(self.manifest["code_shape"])
        grid = codes.shape[: codes.ndim - n_code_axes]
        per_cell = int(np.prod(self.manifest["code_shape"])) if n_code_axes else 1
        cells = int(np.prod(grid))
        flat = codes.reshape(cells, per_cell)
        pos = torch.arange(cells).unsqueeze(1).expand(cells, per_cell)
        lvl = torch.arange(per_cell).unsqueeze(0).expand(cells, per_cell)
        if self.order == "flatten":
            flat, pos, lvl = flat.t(), pos.t(), lvl.t()
        return {"tokens": flat.reshape(-1), "positions": pos.reshape(-1), "levels": lvl.reshape(-1),
                "shape": list(codes.shape), "source": it["source"], "size": it["size"]}

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
