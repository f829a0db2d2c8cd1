"""Media files <-> token files.

Token file format (``tvq-tokens/1``): a safetensors file, so it is memory-mappable,
language-neutral and never pickled. Tensors ``codes.0``, ``codes.1``, ... hold one
item each, int32 (int64 when the codebook exceeds 2^31), shaped
``(*grid, *code_shape)``: ``(h, w)`` for images, ``(frames,)`` for audio,
``(t, h, w)`` for video, plus a level/group axis for residual/grouped codes.
The safetensors metadata (string to string) holds:

- ``format``: ``"tvq-tokens/1"``
- ``model_id``, ``modality``, ``codebook_size``, ``code_shape`` (JSON list)
- ``items``: a JSON list, one object per item: ``source`` (file name), ``size``
  (original ``[H, W]``, ``[samples]`` at the model rate, or ``[T, H, W]``),
  ``sample_rate`` (audio: the model's, which ``size`` counts in) and ``source_sample_rate``
  (the file's), ``fps`` (video), ``pixel_aspect`` (video with non-square
  pixels: ``[width, height]`` of a pixel), ``channels`` of the source, and
  ``sha256``: the hex sha256 of the item's tensor data as stored (little-endian, C
  order), checked by :func:`load_tokens` (files written without it load unchecked), and
  ``source_sha256``, that of the source file's bytes (a decode never writes over it).
- ``model_sha256``: the writing model's weights
  (:func:`~tokenizers_vq.export_record.weights_sha256`), so a decode can tell another
  model of the same name.
- ``header_sha256``: the hex sha256 of ``model_id``, ``modality``, ``codebook_size``,
  ``code_shape``, ``items`` and ``model_sha256`` as stored, each followed by a newline: with
  the items' own digests it covers the whole file (files written without it load unchecked).

Writing checks each item's codes, and decoding each item's grid against the one the model
gives for its recorded ``size`` (:meth:`~tokenizers_vq.tokenizer.Tokenizer.grid_shape`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from tokenizers_vq.backbones.time_chunks import frames_progress
from tokenizers_vq.export_record import same_weights, weights_sha256
from tokenizers_vq.io import (MIN_FPS, atomic_write, check_can_write, check_writable, file_sha256, save_safetensors,
                              tensor_sha256)
from tokenizers_vq.media import MAX_PIXELS, SUFFIXES, suffix_modality
from tokenizers_vq.modality import get as get_modality
from tokenizers_vq.token_header import Damaged, check_header, header_sha256
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.weights import safetensors_name

FORMAT = "tvq-tokens/1"


@dataclass
class TokenRecord:
    """One encoded media item (see the module docstring for fields)."""

    codes: Tensor
    source: str
    size: list[int]
    info: dict[str, Any] = field(default_factory=dict)
    source_sha256: str | None = None  # the source file's bytes, so a decode can tell the original


def encode_file(tok: Tokenizer, path: str | os.PathLike, max_frames: int | None = None,
                max_pixels: int | None = MAX_PIXELS) -> TokenRecord:
    """Read a media file of the tokenizer's modality (as
    :func:`~tokenizers_vq.media.load_input` does) and encode it (video: at most
    ``max_frames`` frames; images of at most ``max_pixels`` pixels)."""
    from tokenizers_vq.media import load_input  # noqa: PLC0415

    if tok.is_dynamic:
        raise ValueError("a dynamic-length tokenizer's PackedCodes do not fit token files (fixed grids); "
                         "write them with tvq export (tokenizers_vq.export.export_dataset)")
    path = Path(path)
    check_input_modality(tok, path)
    device = next(tok.parameters()).device
    if tok.modality == "video":  # compact frames, expanded a clip at a time (clips are coded apart)
        x, size, info = tok.media.load_compact(path, tok.sample_rate, max_frames, max_pixels)
        parts = x.split(tok.config.clip_frames, dim=1)
    else:
        x, size, info = load_input(path, tok.modality, tok.sample_rate, max_frames, max_pixels)
        parts = [x]
    try:
        with (tqdm(parts, desc=f"{path.name}: clips", unit="clip", disable=len(parts) < 2, leave=False) as bar,
              frames_progress(f"{path.name}: frames") if len(parts) == 1 else nullcontext()):
            codes = torch.cat([tok.encode(tok.media.expand(p).unsqueeze(0).to(device))[0].cpu() for p in bar])
    except ValueError as e:  # the tokenizer's refusal (e.g. too small), said of this file
        raise ValueError(f"{path}: {e}") from e
    name = Path(os.path.abspath(path)).name  # a frame folder given as "." has a name too
    return TokenRecord(codes, name, size, info, file_sha256(path) if path.is_file() else None)


def check_input_modality(tok: Tokenizer, path: Path) -> None:
    """Refuse a media file of another modality than the tokenizer's (by its suffix; a
    folder of frames is a video), naming the model and the fix."""
    from tokenizers_vq.media import modality_of  # noqa: PLC0415

    kind = get_modality(modality_of(path, unknown=tok.modality))
    if kind.name != tok.modality:
        raise ValueError(f"{path} is {kind.article} file, but model {tok.config.name!r} is {tok.media.article} tokenizer; "
                         f"use {kind.article} model (leave out --model to get the embedded "
                         f"'{kind.default_model}' one, or Tokenizer.from_pretrained('{kind.default_model}'))")


def default_model_name(paths: Sequence[str | os.PathLike]) -> str:
    """The embedded model (``"image"``, ``"speech"`` or ``"video"``) for media files
    by their type.

    Raises:
        ValueError: the files mix modalities (a token file holds one), or one is not
            a media file.
    """
    from tokenizers_vq.media import modality_of  # noqa: PLC0415

    kinds = {Path(p).name: modality_of(p) for p in paths}
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        example = ", ".join(f"{next(n for n, k in kinds.items() if k == m)} is {m}" for m in found)
        raise ValueError(f"the inputs mix {' and '.join(found)} files ({example}); a token file holds one "
                         "modality: encode each kind in its own call")
    return get_modality(found[0]).default_model


def check_grid(tok: Tokenizer, rec: TokenRecord, name: str | None = None, values: bool = False) -> None:
    """Refuse codes whose shape is not the ``(*grid, *code_shape)`` that ``tok`` gives
    for the record's original ``size`` (a cut or padded grid would decode to media of
    another size); with ``values``, also codes that are not integers in ``[0, codebook_size)``
    (a token file keeps int32: an id past it would be stored as another). ``name`` names the
    item in the message (default: its source)."""
    c, size = rec.codes, tok.quantizer.codebook_size
    bad = c.is_floating_point() or c.is_complex() or c.dtype is torch.bool
    if values and (bad or (c.numel() and not 0 <= int(c.long().min()) <= int(c.long().max()) < size)):
        found = c.dtype if bad else f"ids in [{int(c.long().min())}, {int(c.long().max())}]"
        raise ValueError(f"{name or rec.source}: codes must be integers in [0, {size}) for model {tok.config.name!r}, "
                         f"got {found} (a vocabulary's offset left on, or another model's codes?)")
    expected = (*tok.grid_shape(rec.size), *tok.quantizer.code_shape)
    if tuple(rec.codes.shape) != expected:
        raise ValueError(f"{name or rec.source}: codes of shape {list(rec.codes.shape)}, but model {tok.config.name!r} "
                         f"codes its recorded size {list(rec.size)} as {list(expected)}; the grid was cut or padded, "
                         "or the size or the model is not the one it was encoded with")


def decode_record(tok: Tokenizer, rec: TokenRecord) -> Tensor:
    """Media tensor of one record: image ``(3, H, W)`` / video ``(T, 3, H, W)`` in
    [0, 1], audio ``(1, T)`` in [-1, 1].

    Raises:
        ValueError: the codes' shape does not fit the record's size (:func:`check_grid`).
    """
    check_grid(tok, rec)
    device = next(tok.parameters()).device
    out = tok.decode(rec.codes.long().unsqueeze(0).to(device), size=tuple(rec.size))[0].float().cpu()
    return tok.media.to_media(out)


def decoded_media(tok: Tokenizer, rec: TokenRecord) -> Tensor:
    """:func:`decode_record`'s media as it is saved: video as uint8 frames ``(T, 3, H, W)``,
    decoded and converted a clip at a time (clips are decoded apart), so a long clip is held
    as bytes, a quarter of its float frames."""
    if tok.modality != "video":
        return decode_record(tok, rec)
    from tokenizers_vq.video_io import to_bytes  # noqa: PLC0415

    check_grid(tok, rec)
    device = next(tok.parameters()).device
    (frames, h, w), done, out = rec.size, 0, []
    per_clip = tok.grid_shape((tok.config.clip_frames, h, w))[0]  # latent frames of one whole clip
    clips = rec.codes.long().unsqueeze(0).split(per_clip, dim=1)
    for c in tqdm(clips, desc=f"{rec.source}: clips", unit="clip", disable=len(clips) < 2, leave=False):
        with frames_progress(f"{rec.source}: frames") if len(clips) == 1 else nullcontext():
            clip = tok.decode(c.to(device))[0, :, : frames - done, :h, :w].float().cpu()
        out.append(to_bytes(tok.media.to_media(clip)))
        done += out[-1].shape[0]
    return torch.cat(out)


def save_media(tok: Tokenizer, media: Tensor, rec: TokenRecord, path: str | os.PathLike) -> Path:
    return tok.media.save(media, path, tok.sample_rate, rec.info)


def save_tokens(path: str | os.PathLike, tok: Tokenizer, records: Sequence[TokenRecord]) -> Path:
    """Write records to a token file atomically.

    Raises:
        ValueError: a record that the file could not give back: a size that is not positive whole
            numbers (an empty stream's), or codes that do not fit it (:func:`check_grid`); named
            before anything is written.
    """
    for i, r in enumerate(records):
        if not (isinstance(r.size, (list, tuple)) and r.size and all(type(n) is int and n > 0 for n in r.size)):
            raise ValueError(f"record {i} ({r.source}): size {r.size!r} is not positive whole numbers; leave out an "
                             "item with no samples or pixels (e.g. a stream flushed before any audio)")
        check_grid(tok, r, f"record {i} ({r.source})", values=True)
    q = tok.quantizer
    dtype = torch.int32 if q.codebook_size <= 2**31 else torch.int64
    tensors = {f"codes.{i}": r.codes.to(dtype).contiguous() for i, r in enumerate(records)}
    items = [{"source": r.source, "size": r.size, **r.info, "sha256": tensor_sha256(tensors[f"codes.{i}"]),
              **({"source_sha256": r.source_sha256} if r.source_sha256 else {})} for i, r in enumerate(records)]
    meta = {
        "format": FORMAT,
        "model_id": tok.config.name,
        "modality": tok.modality,
        "codebook_size": str(q.codebook_size),
        "code_shape": json.dumps(list(q.code_shape)),
        "items": json.dumps(items),
    }
    meta["model_sha256"] = weights_sha256(tok)
    meta["header_sha256"] = header_sha256(meta)
    try:  # what load_tokens would refuse, or could not decode (a frame rate no video file holds), is not written
        check_header(meta, items, writing=True)
    except Damaged as e:
        raise ValueError(f"cannot write {path}: the file would not load back: {e}") from None
    return atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata=meta))


def load_tokens(path: str | os.PathLike) -> tuple[dict[str, str], list[TokenRecord]]:
    """Read a token file: its header (metadata) and records, each item's codes checked
    against its recorded ``sha256`` (items written without one are taken as they are).

    Raises:
        ValueError: not a readable ``tvq-tokens/1`` file, or an item's codes do not
            match their checksum (named by index and source).
    """
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    path = Path(path)
    if path.is_dir():
        export = (" (an export's shards: read them with tokenizers_vq.export.TokenDataset)"
                  if (path / "manifest.json").is_file() else "")
        raise ValueError(f"{path} is a folder{export}, not a token file: decode reads the file `tvq encode -o` wrote")
    if not path.is_file():
        raise ValueError(f"token file not found: {path}" if not path.exists() else f"{path} is not a regular file (a "
                         "pipe or a device?): decode reads the token file `tvq encode -o` wrote; copy a piped one to a file")
    try:
        with safetensors_name(path) as name, safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} token file (format={meta.get('format')!r})")
            items = json.loads(meta["items"]) if isinstance(meta.get("items"), str) else None
            check_header(meta, items)
            records = []
            for i, it in enumerate(items):
                codes, digest = f.get_tensor(f"codes.{i}"), it.pop("sha256", None)
                if codes.dtype not in (torch.int32, torch.int64):
                    raise Damaged(f"item {i} ({it['source']}) holds {codes.dtype} codes, not int32 or int64")
                if digest is not None and tensor_sha256(codes) != digest:
                    raise ValueError(f"{path}: item {i} ({it['source']}): its codes do not match their recorded "
                                     "sha256; the file was altered or damaged after it was written: encode the "
                                     "source again")
                source_digest = it.pop("source_sha256", None)
                records.append(TokenRecord(codes, it.pop("source"), it.pop("size"), it, source_digest))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        kind = suffix_modality(path)
        if kind is not None:
            raise ValueError(f"{path} is {get_modality(kind).article} file, not a token file: decode reads what "
                             f"`tvq encode` wrote (e.g. `tvq encode {path.name} -o tokens.tvq`)") from None
        raise ValueError(f"corrupt token file {path}: {e}") from e
    except Damaged as e:
        raise ValueError(f"corrupt token file {path}: {e}; encode the sources again") from None
    return meta, records


def check_compatible(meta: dict[str, str], tok: Tokenizer, path: Path) -> None:
    """Token files decode only with a tokenizer of the same modality and codes."""
    fix = ("; it was written by another model of that name (trained from the same config, or another version of it): "
           "pass --model DIR of the model that wrote it" if meta.get("model_id") == tok.config.name else
           f"; decode with the model that wrote it ({meta.get('model_id', '?')!r}: leave out --model for an embedded "
           "default, or pass its directory)")
    if meta["modality"] != tok.modality or int(meta["codebook_size"]) != tok.quantizer.codebook_size:
        raise ValueError(
            f"{path} holds {meta['modality']} tokens of model {meta['model_id']!r} "
            f"(codebook {meta['codebook_size']}), but the tokenizer is {tok.modality} {tok.config.name!r} "
            f"(codebook {tok.quantizer.codebook_size})" + fix
        )
    if json.loads(meta["code_shape"]) != list(tok.quantizer.code_shape):
        raise ValueError(f"{path}: code shape {meta['code_shape']} (codes per position) does not match the "
                         f"{list(tok.quantizer.code_shape)} of {tok.config.name!r}" + fix)


class OtherModelWarning(UserWarning):
    """Tokens decoded by another model than the one that wrote them: the codes fit its
    quantizer, but its decoder may read them differently."""


def other_model(meta: dict[str, str], tok: Tokenizer, path: str | os.PathLike) -> str | None:
    """Why ``tok`` is not the model that wrote the token file ``path`` (another name, or the
    same name with other weights: retrained, another version), or None when it is."""
    if meta["model_id"] != tok.config.name:
        return (f"{path} was written by model {meta['model_id']!r}; decoding with {tok.config.name!r}, whose "
                "decoder may read its codes differently")
    if (h := meta.get("model_sha256")) is not None and not same_weights(h, tok):
        return (f"{path} was written by a model named {meta['model_id']!r} with other weights than this one's "
                "(retrained, another version, or the same cast to another precision); its decoder may read the "
                "codes differently: decode with the model that wrote them")
    return None


def encode_files(tok: Tokenizer, paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                 max_pixels: int | None = MAX_PIXELS) -> Path:
    """Encode media files into one token file (all inputs are read before anything is written;
    an output that cannot be written, a missing input or one of another modality than the
    model's is refused before any is read)."""
    if str(out).endswith(("/", os.sep)) or Path(out).is_dir():
        raise ValueError(f"{out} names a folder: give the token file's name (e.g. {Path(out) / 'tokens.tvq'})")
    target = Path(out)
    kind = suffix_modality(target)
    if kind is not None or any(target.resolve() == Path(p).resolve() for p in paths):
        why = "is one of the inputs" if kind is None else f"has the suffix of {get_modality(kind).article} file"
        raise ValueError(f"{out} {why}: the token file would be written over media; "
                         f"name the token file {target.with_suffix('.tvq').name} (or any name without a media suffix)")
    if target.is_file() and target.stat().st_size and not _is_token_file(target):
        raise ValueError(f"{out} exists and is not a token file: tvq encode would replace it; name another output "
                         "(e.g. tokens.tvq), or delete it first")
    check_can_write(out)
    for p in paths:  # every input present and of the model's type before the first is encoded
        check_input_modality(tok, Path(p))
    with tqdm(paths, desc="encode", disable=len(paths) < 2) as bar:  # closed (its line ended) if an input fails
        records = [encode_file(tok, p, max_pixels=max_pixels) for p in bar]
    return save_tokens(out, tok, records)


def _is_token_file(path: Path) -> bool:
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safetensors_name(path) as name, safe_open(name, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 (anything unreadable as one is not one)
        return False


def decode_file(tok: Tokenizer, tokens: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Decode a token file. ``out`` is the output file for a single item (its suffix picks the
    format) or a directory that receives ``<source stem><ext>`` per item. Every item's checksum
    and grid are checked before anything is written; tokens of another model (:func:`other_model`)
    decode with an :class:`OtherModelWarning`. A single item's ``out`` file is replaced; files in
    the folder are replaced only with ``overwrite``; never the file an item was encoded from."""
    meta, records = load_tokens(tokens)
    check_compatible(meta, tok, Path(tokens))
    other = other_model(meta, tok, tokens)
    if other is not None:
        warnings.warn(other, OtherModelWarning, stacklevel=2)
    for i, rec in enumerate(records):  # ids too: a file another program wrote may hold ids past the codebook
        check_grid(tok, rec, f"{tokens}: item {i} ({rec.source})", values=True)
        if tok.modality == "video" and (fps := rec.info.get("fps", 25.0)) < MIN_FPS:
            raise ValueError(f"{tokens}: item {i} ({rec.source}) runs at {fps:.6g} frames per second, under the 1/1001 "
                             "a video file is written at: decode its frames in Python (Tokenizer.decode) instead")
    folder = str(out).endswith(("/", os.sep)) or Path(out).is_dir()  # (Path() drops the slash that says so)
    out = Path(out)
    single = len(records) == 1 and out.suffix != "" and not folder
    other = suffix_modality(out) or tok.modality
    if single and out.suffix.lower() not in SUFFIXES[tok.modality] and other != tok.modality:
        raise ValueError(f"{out}: {out.suffix} is a file type for {other}, but {tokens} holds {tok.modality} tokens; "
                         f"write {tok.media.article} file "
                         f"(e.g. {out.with_suffix(tok.media.output_suffix).name})")
    if single:
        check_writable(tok.modality, out, records[0].size)  # before any decoding (a picture too large for it too)
    elif len(records) > 1 and suffix_modality(out) is not None and not folder:
        raise ValueError(f"{tokens} holds {len(records)} items: name a folder for them, not the file {out.name}")
    targets = [out] if single else _folder_targets(out, records, tok.media.output_suffix)
    for rec, target in zip(records, targets):
        if rec.source_sha256 and target.is_file() and file_sha256(target) == rec.source_sha256:
            raise ValueError(f"{target} is the file {rec.source} was encoded from (its bytes match the digest the "
                             "token file records): the decoded copy would replace the original; decode into another "
                             "folder or file name")
    if not (single or overwrite) and (kept := [t for t in targets if os.path.lexists(t)]):
        more = f" (and {len(kept) - 1} more of the {len(targets)} files to write)" if len(kept) > 1 else ""
        raise ValueError(f"{kept[0]} exists{more}: decoding into a folder replaces none of its files; decode into "
                         "another folder, or pass --overwrite (overwrite=True) to replace them")
    for target in targets:  # every target that cannot be written is found before any decoding
        check_can_write(target)
    written = []
    with tqdm(list(zip(records, targets)), desc="decode", disable=len(records) < 2) as bar:
        for rec, target in bar:
            written.append(save_media(tok, decoded_media(tok, rec), rec, target))
            if tok.modality == "video" and (rec.size[1] % 2 or rec.size[2] % 2):
                (h, w), (h2, w2) = rec.size[1:], (n // 2 * 2 for n in rec.size[1:])
                warnings.warn(f"{written[-1]} is {w2}x{h2} pixels, not the {w}x{h} its tokens record: H.264 codes even "
                              "sizes, so the last row or column was cut", stacklevel=2)
    return written


def _folder_targets(folder: Path, records: Sequence[TokenRecord], suffix: str) -> list[Path]:
    """``<source stem><suffix>`` per record in ``folder``; where two records would get one
    name (``a/x.jpg`` and ``b/x.jpg``, or ``x.jpg`` and ``x.png``), each of them is named
    ``<stem>-<item index><suffix>`` instead, so no decoded item replaces another."""
    names = [Path(r.source).stem + suffix for r in records]
    taken = {n for n in names if names.count(n) > 1}
    names = [f"{Path(r.source).stem}-{i}{suffix}" if n in taken else n for i, (r, n) in enumerate(zip(records, names))]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise ValueError(f"two items would both be decoded to {folder / clash}; decode them with "
                         "decode_record and name the files yourself")
    return [folder / n for n in names]
