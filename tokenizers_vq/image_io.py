"""Image files in and out through Pillow: ``(3, H, W)`` RGB, upright, in sRGB."""

from __future__ import annotations

import contextlib
import contextvars
import io
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from tokenizers_vq.errors import UNREADABLE
from tokenizers_vq.io import atomic_write, check_image_size, check_media_file, check_pixels


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
"""Pillow's modes with an alpha band (``a``: premultiplied; LAB's ``A`` is a colour, not alpha)."""


def image_header(path: str | os.PathLike,
                 max_pixels: int | None | Literal["pillow"] = "pillow") -> tuple[int, int, int]:
    """``(width, height, channels)`` of an image file, from its header (and, for formats that
    decode on opening such as ICO, a picture within ``max_pixels``, as :func:`load_image_u8`
    takes it; the header's size is the caller's to check). Channels are as stored: 1 (greyscale),
    2 (greyscale + alpha, or with a transparent colour key), 3 (RGB or a palette), 4 (RGBA, CMYK,
    RGB with a colour key, or a palette with transparency)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    check_media_file(Path(path), "image")
    try:
        with warnings.catch_warnings(), _pixel_limit(_limit(max_pixels)):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (the header's size: the caller's)
            with Image.open(path) as im:
                return (*im.size, _stored_channels(im))
    except _OverLimit as e:
        check_pixels(Path(path), *e.size, max_pixels)  # (its words: the limit, the size, --max-pixels)
        raise  # (not reached: the size is over the limit)
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e} {UNREADABLE}") from e


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as ``(3, H, W)`` float32 in ``[0, 1]`` (:func:`load_image_u8`
    divided by 255)."""
    return load_image_u8(path).float() / 255.0


def exif_turned(im) -> bool:
    """Whether an open Pillow image's EXIF orientation says it is not stored upright."""
    return im.getexif().get(0x0112, 1) != 1


def load_image_u8(path: str | os.PathLike, max_pixels: int | None | Literal["pillow"] = "pillow") -> Tensor:
    """Read an image file as ``(3, H, W)`` uint8.

    Greyscale is repeated to RGB; an alpha channel (or a palette's or colour key's
    transparency) is composited on white; colours are converted to sRGB from an embedded
    colour profile of another space (a phone's Display P3), as viewers do (token
    files record the source's own channel count, :func:`image_header`). A photo's EXIF
    orientation (as cameras and phones record a turned shot) is applied, as viewers do:
    the pixels come upright, and the recorded size is the upright one.

    Args:
        max_pixels: refuse an image whose header claims more pixels (``tvq encode --max-pixels``);
            ``None``: no limit; ``"pillow"``: Pillow's own guard, ``PIL.Image.MAX_IMAGE_PIXELS``
            (89 million unless raised there; PIL itself only warns below twice that). A number
            or ``None`` stands in for Pillow's guard for this read only (other threads keep it).

    Raises:
        ValueError: the file is missing, unreadable, truncated or not an image, or its
            header claims more pixels than the limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415 (keep import cheap)

    path = Path(path)
    check_media_file(path, "image")
    try:
        with warnings.catch_warnings(), _pixel_limit(_limit(max_pixels)):
            # a header of a few hundred bytes can claim 178 million pixels, which PIL
            # merely warns about: about 3 GB of buffers here before the data runs out
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # (a size over a limit of ours: _OverLimit, from Pillow's check)
                im.load()
                if exif_turned(im):
                    im = ImageOps.exif_transpose(im)
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # convert() would clip 16-bit grey, not scale it
                    im = _grey_to_8bit(im, path)
                im = _to_srgb(im, path)
                if im.mode in ALPHA_MODES or "transparency" in im.info:  # (a palette's or a colour key)
                    rgba = im.convert("RGBA")
                    im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                rgb = im.convert("RGB")
    except _OverLimit as e:
        check_pixels(path, *e.size, max_pixels)  # (its words: the limit, the size, --max-pixels)
        raise  # (not reached: the size is over the limit)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        fix = "" if max_pixels != "pillow" else (" (Pillow's guard: load_image_u8 takes max_pixels= a number, or "
                                                 "None for no limit; tvq encode --max-pixels; or raise "
                                                 "PIL.Image.MAX_IMAGE_PIXELS)")
        raise ValueError(f"cannot read image {path}: {e}{fix}") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e} {UNREADABLE}") from e
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1)


class _OverLimit(Exception):
    """A picture of ``size`` pixels met in a file, over the :func:`_pixel_limit` in force."""

    def __init__(self, width: int, height: int):
        super().__init__(f"{width}x{height}")
        self.size = (width, height)


_PIXEL_LIMIT = contextvars.ContextVar("tvq_pillow_pixel_limit", default=None)
_GUARD_HOOK = threading.Lock()


@contextlib.contextmanager
def _pixel_limit(limit: float | None):
    """Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) replaced, in this block and
    for this thread only, by ``limit`` pixels (``None``: Pillow's own guard; ``math.inf``: none): a
    context variable read by a wrapper of Pillow's check, installed once, which every Pillow reader
    calls for each picture it decodes (the embedded pictures of an ICO too); other threads, and this
    one outside the block, keep Pillow's guard."""
    from PIL import Image  # noqa: PLC0415

    with _GUARD_HOOK:
        check = getattr(Image, "_decompression_bomb_check", None)
        if check is not None and not getattr(check, "tvq_hook", False):  # (a Pillow without it keeps its guard)
            def hooked(size, *args, **kwargs):
                most = _PIXEL_LIMIT.get()
                if most is None:
                    return check(size, *args, **kwargs)
                if size[0] * size[1] > most:
                    raise _OverLimit(*size)
                return None

            hooked.tvq_hook = True
            Image._decompression_bomb_check = hooked  # noqa: SLF001
    token = _PIXEL_LIMIT.set(limit)
    try:
        yield
    finally:
        _PIXEL_LIMIT.reset(token)


def _limit(max_pixels: int | None | Literal["pillow"]) -> float | None:
    """The pixel limit :func:`_pixel_limit` takes for a ``max_pixels`` argument."""
    return None if max_pixels == "pillow" else math.inf if max_pixels is None else max_pixels


def _stored_channels(im) -> int:
    """The channel count an open Pillow image's file stores (:func:`image_header`)."""
    raw = im.tile[0][3] if im.tile else None  # (codec, extents, offset, rawmode or a tuple starting with it)
    if (raw[0] if isinstance(raw, tuple) else raw) in ("LA;16B", "LA;16", "LA;16L"):
        return 2  # 16-bit grey + alpha, which Pillow reads as RGBA
    keyed = "transparency" in im.info  # a palette's or a colour key's transparent pixels
    if im.mode in ("P", "PA"):
        return 3 + (keyed or im.mode == "PA")
    return len(im.getbands()) + (keyed and im.mode in ("L", "RGB"))


def _foreign_profile(im):
    """An open Pillow image's embedded colour profile when it is of another space than sRGB
    (RGB, RGBA, CMYK and palette images: a palette holds RGB colours), else None. Raises
    ``ImageCms.PyCMSError`` (or ``OSError`` / ``ValueError``) for a profile that cannot be read."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK", "P"):
        return None
    from PIL import ImageCms  # noqa: PLC0415

    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return None if "srgb" in ImageCms.getProfileDescription(profile).lower().replace(" ", "") else profile


def recoloured(im) -> bool:
    """Whether an open Pillow image reads in other colours than its stored values: an
    embedded colour profile of another space than sRGB, or a transparent colour key."""
    if "transparency" in im.info and im.mode in ("L", "RGB"):
        return True
    from PIL import ImageCms  # noqa: PLC0415

    try:
        return _foreign_profile(im) is not None
    except (ImageCms.PyCMSError, OSError, ValueError):
        return False  # read as stored (with a warning)


def _to_srgb(im, path: Path):
    """``im`` with its colours in sRGB: converted from an embedded ICC profile of another
    space (:func:`_foreign_profile`), else as it is. A profile that cannot be applied is
    named in a warning and the stored values are kept."""
    if not im.info.get("icc_profile"):
        return im
    from PIL import ImageCms  # noqa: PLC0415

    try:
        profile = _foreign_profile(im)
        if profile is None:
            return im
        if im.mode == "P":  # its palette's colours, then converted as an RGB image's (a key becomes alpha)
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = "RGBA" if im.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(im, profile, ImageCms.createProfile("sRGB"), outputMode=mode)
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        warnings.warn(f"{path}: its colour profile could not be applied ({e}); its colours are read as sRGB",
                      stacklevel=3)
        return im


def _grey_to_8bit(im, path: Path):
    """A 16-bit greyscale image (or 32-bit integer pixels within 16 bits) scaled from the
    16-bit range to 8 bits (a 12-bit scan comes out dark: its range is not recorded). Values
    that all fit 8 bits (an 8-bit picture stored in wider pixels) come out black, with a warning."""
    from PIL import Image  # noqa: PLC0415

    arr = np.asarray(im)
    if im.mode == "F" or arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"cannot read image {path}: {im.mode} pixels in [{arr.min()}, {arr.max()}] have no known "
                         "range; save it with 8 or 16 bits per channel")
    if 0 < arr.max() <= 255:
        warnings.warn(f"{path}: its {16 if im.mode.startswith('I;16') else 32}-bit grey pixels hold values of at most "
                      f"{arr.max()}, read on the 16-bit scale: the picture comes out black; if they are 8-bit values, "
                      "save it with 8 bits per channel", stacklevel=3)
    return Image.fromarray((arr.astype(np.float32) / 257).round().astype(np.uint8), "L")


def fit_image(img: Tensor, side: int, crop: bool = False, max_pixels: int | None = None) -> Tensor:
    """``(3, H, W)`` uint8 pixels resized so that the shorter side is ``side`` (the aspect kept,
    the longer side rounded to whole pixels; Pillow's bicubic filter, antialiased when it
    shrinks, in integer arithmetic: the same pixels wherever the same Pillow runs), then with
    ``crop`` cut to the central ``side x side`` (``tvq export --resize``; as torchvision's
    ``Resize`` and ``CenterCrop`` prepare AR training sets, but the longer side rounded, not
    truncated: a pixel row or column may differ).

    Raises:
        ValueError: ``img`` is not ``(3, H, W)`` uint8, or the resized image would hold more
            than ``max_pixels`` (a thin strip scaled up; ``None``: no limit).
    """
    from PIL import Image  # noqa: PLC0415

    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"fit_image expects (3, H, W) uint8 pixels, got {img.dtype} of shape {tuple(img.shape)}")
    h, w = img.shape[1:]
    nh, nw = (side, max(side, round(w * side / h))) if h <= w else (max(side, round(h * side / w)), side)
    if max_pixels is not None and nh * nw > max_pixels:
        raise ValueError(f"a {h} x {w} image resized to a shorter side of {side} would be {nh} x {nw} pixels, over "
                         f"the limit of {max_pixels}: leave it out, or resize to a smaller side")
    if (nh, nw) != (h, w):
        im = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB").resize((nw, nh), Image.Resampling.BICUBIC)
        img = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(nh, nw, 3).permute(2, 0, 1)
    if crop:
        top, left = (nh - side) // 2, (nw - side) // 2
        img = img[:, top : top + side, left : left + side]
    return img.contiguous()


def save_image(img: Tensor, path: str | os.PathLike) -> Path:
    """Write ``(3, H, W)`` or ``(H, W)`` float in ``[0, 1]`` (clamped) atomically;
    the format follows the suffix (PNG, JPEG, ...).

    Raises:
        ValueError: the picture is larger than the format holds (:data:`~tokenizers_vq.io.IMAGE_SIDES`,
            checked before any work), or Pillow's writer fails on it: the message names ``path``.
    """
    from PIL import Image  # noqa: PLC0415

    if img.ndim == 2:
        img = img.unsqueeze(0).expand(3, -1, -1)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"save_image expects (3, H, W) or (H, W), got shape {tuple(img.shape)}")
    check_image_size(path, img.shape[2], img.shape[1])
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte().expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()

    def write(tmp: str) -> None:
        try:
            Image.fromarray(arr, "RGB").save(tmp)
        except (OverflowError, RuntimeError, ValueError, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:  # the disk's failure, named by atomic_write
                raise
            raise ValueError(f"cannot write {path}: Pillow's writer for {Path(path).suffix} failed on a "
                             f"{arr.shape[1]}x{arr.shape[0]} picture ({e}); name it .png, which holds any size") from e

    return atomic_write(path, write)
