"""Media in and out. Images through PIL; every write is atomic (a temporary file
renamed into place), so a failed write never leaves a half-written or clobbered file."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file sits beside ``path`` (same filesystem, so the rename is
    atomic) and keeps ``path``'s suffix so writers that pick a format by suffix work.

    Raises:
        ValueError: ``path`` is an existing directory, or its folder is an existing file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, but a file is written here; give a file name "
                         f"(e.g. {path / ('out' + (path.suffix or '.tvq'))})")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: {path.parent} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def tensor_sha256(*parts: Tensor | str) -> str:
    """Hex sha256 over ``parts`` in order: a string as its UTF-8 bytes, a tensor as its
    raw bytes in C order (native byte order: little-endian on every supported machine;
    for int32 codes, the bytes a safetensors file stores)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on its contents: the header's keys
    sorted (the ``safetensors`` package writes the metadata in a per-process hash order,
    so the same tokens gave different files from two processes), tensors in name order,
    little-endian, the header padded with spaces to 8 bytes. Any safetensors reader
    reads it."""
    import json  # noqa: PLC0415
    import struct  # noqa: PLC0415

    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"save_safetensors: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        blob = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


MAX_PIXELS = 4096 * 4096
"""Default largest image (in pixels, H x W) that :func:`~tokenizers_vq.media.load_input`
reads for a tokenizer: the embedded f16 model asked for 25.6 GB at 10000 x 10000 pixels
on a CPU, and memory grows linearly with the pixel count (about 4 GB at this limit). Raise it with ``max_pixels=`` or
``tvq encode --max-pixels``."""


def image_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(width, height, channels)`` of an image file, from its header only. Channels
    are as stored: 1 (greyscale), 2 (greyscale + alpha), 3 (RGB or a palette), 4 (RGBA,
    CMYK, or a palette with transparency)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with warnings.catch_warnings():  # sizes are checked against MAX_PIXELS by the caller
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                channels = (4 if "transparency" in im.info else 3) if im.mode == "P" else len(im.getbands())
                return (*im.size, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as ``(3, H, W)`` float32 in ``[0, 1]``.

    Greyscale is repeated to RGB; an alpha channel is composited on white (token
    files record the source's own channel count, :func:`image_header`).

    Raises:
        ValueError: the file is missing, unreadable, truncated or not an image, or its
            header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89 million
            unless raised there; PIL itself only warns below twice that).
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 (keep import cheap)

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            # a header of a few hundred bytes can claim 178 million pixels, which PIL
            # merely warns about: about 3 GB of buffers here before the data runs out
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255.0


def save_image(img: Tensor, path: str | os.PathLike) -> Path:
    """Write ``(3, H, W)`` or ``(H, W)`` float in ``[0, 1]`` (clamped) atomically;
    the format follows the suffix (PNG, JPEG, ...)."""
    from PIL import Image  # noqa: PLC0415

    if img.ndim == 2:
        img = img.unsqueeze(0).expand(3, -1, -1)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"save_image expects (3, H, W) or (H, W), got shape {tuple(img.shape)}")
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte().expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()
    return atomic_write(path, lambda tmp: Image.fromarray(arr, "RGB").save(tmp))


def bundled_photo() -> Path:
    """A real photograph shipped with an installed dependency (matplotlib's
    ``grace_hopper.jpg``, 512x600), for demos and examples."""
    import matplotlib  # noqa: PLC0415

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"matplotlib's sample photo is missing at {path}; pass your own image file")
    return path
