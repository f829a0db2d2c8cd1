"""A token file's header: the fields it must hold and the digest that covers them (the format is
described in :mod:`tokenizers_vq.tokens`)."""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers_vq.io import MAX_FPS, MIN_FPS, tensor_sha256

_HEADER = ("model_id", "modality", "codebook_size", "code_shape", "items")


def header_sha256(meta: dict[str, str]) -> str:
    """The ``header_sha256`` of a token file's metadata (see :mod:`tokenizers_vq.tokens`)."""
    extra = ("model_sha256",) if "model_sha256" in meta else ()
    return tensor_sha256(*(meta[k] + "\n" for k in _HEADER + extra))


class Damaged(ValueError):
    """What is wrong in a token file's header or tensors (:func:`load_tokens` names the file)."""


def check_header(meta: dict[str, str], items: Any, writing: bool = False) -> None:
    """Raise :class:`Damaged` naming the first field of a token file's header that is missing,
    altered (``header_sha256``) or not of its type; ``writing``: also a frame rate under the
    1/1001 a video file is written at (read, such a file's items are refused as they decode)."""
    missing = [k for k in _HEADER if not isinstance(meta.get(k), str)]
    if missing:
        raise Damaged(f"its header lacks {', '.join(missing)}")
    digest = meta.get("header_sha256")
    if digest is not None and digest != header_sha256(meta):
        raise Damaged("its header does not match its recorded header_sha256: it was altered or damaged "
                       "after it was written")
    if not re.fullmatch(r"[1-9][0-9]*", meta["codebook_size"]):  # (str.isdigit takes "²" too)
        raise Damaged(f"codebook_size {meta['codebook_size']!r} is not a positive whole number")
    try:
        shape = json.loads(meta["code_shape"])
    except ValueError:
        shape = None
    if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
        raise Damaged(f"code_shape {meta['code_shape']!r} is not a list of positive whole numbers")
    if not isinstance(items, list):
        raise Damaged("its items are not a list")
    for i, it in enumerate(items):
        size = it.get("size") if isinstance(it, dict) else None
        if not (isinstance(size, list) and size and all(isinstance(n, int) and n > 0 for n in size)
                and isinstance(it.get("source"), str)):
            raise Damaged(f"item {i} lacks a source name or a size of positive whole numbers")
        fps, aspect = it.get("fps", 25.0), it.get("pixel_aspect", [1, 1])
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (
                fps >= MIN_FPS if writing else fps > 0) or fps > MAX_FPS:
            raise Damaged(f"item {i}'s fps {fps!r} is not a frame rate from {'1/1001' if writing else 'above 0'} to "
                          f"{MAX_FPS:,}")
        if not (isinstance(aspect, list) and len(aspect) == 2 and all(type(n) is int and n > 0 for n in aspect)):
            raise Damaged(f"item {i}'s pixel_aspect {aspect!r} is not two positive whole numbers")
