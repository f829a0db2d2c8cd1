"""Media files in and out: images, audio and video, any of them as a tokenizer's input
(:func:`load_input`), and listing the media of a folder.

Images go through Pillow, audio through :mod:`tokenizers_vq.audio_io` (``soundfile``),
video through PyAV, imported only when a video is read or written.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokenizers_vq.audio_io import MIN_SAMPLE_RATE, load_audio, save_audio  # noqa: F401 (this module's API)
from tokenizers_vq.io import atomic_write, check_media_file, check_pixels
from tokenizers_vq.video_io import (  # noqa: F401 (this module's API)
    has_audio_track,
    quarter_turns,
    read_video_file,
    save_video,
    video_turned,
)


MAX_PIXELS = 4096 * 4096
"""Default largest image (in pixels, H x W) that :func:`~tokenizers_vq.media.load_input`
reads for a tokenizer: the embedded f16 model asked for 25.6 GB at 10000 x 10000 pixels
on a CPU, and memory grows linearly with the pixel count (about 4 GB at this limit). Raise it with ``max_pixels=`` or
``tvq encode --max-pixels``."""

MAX_VIDEO_PIXELS = 1920 * 1088
"""What the default :data:`MAX_PIXELS` stands for with video frames (1080p, either way up):
the embedded video model's encoder took 8.2 GB and its decoder 12.0 GB for a 17-frame
1080p clip on a CPU (720p: 4.2 and 5.5 GB), with its full-resolution layers run a few
frames at a time (:data:`tokenizers_vq.backbones.time_chunks.CHUNK_PIXELS`). A ``max_pixels`` the
caller sets applies as given."""


def image_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(width, height, channels)`` of an image file, from its header only. Channels
    are as stored: 1 (greyscale), 2 (greyscale + alpha), 3 (RGB or a palette), 4 (RGBA,
    CMYK, or a palette with transparency)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    check_media_file(Path(path), "image")
    try:
        with warnings.catch_warnings():  # sizes are checked against MAX_PIXELS by the caller
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                channels = (4 if "transparency" in im.info else 3) if im.mode == "P" else len(im.getbands())
                return (*im.size, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as ``(3, H, W)`` float32 in ``[0, 1]`` (:func:`load_image_u8`
    divided by 255)."""
    return load_image_u8(path).float() / 255.0


def exif_turned(im) -> bool:
    """Whether an open Pillow image's EXIF orientation says it is not stored upright."""
    return im.getexif().get(0x0112, 1) != 1


def load_image_u8(path: str | os.PathLike) -> Tensor:
    """Read an image file as ``(3, H, W)`` uint8.

    Greyscale is repeated to RGB; an alpha channel is composited on white (token
    files record the source's own channel count, :func:`image_header`). A photo's EXIF
    orientation (as cameras and phones record a turned shot) is applied, as viewers do:
    the pixels come upright, and the recorded size is the upright one.

    Raises:
        ValueError: the file is missing, unreadable, truncated or not an image, or its
            header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89 million
            unless raised there; PIL itself only warns below twice that).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415 (keep import cheap)

    path = Path(path)
    check_media_file(path, "image")
    try:
        with warnings.catch_warnings():
            # a header of a few hundred bytes can claim 178 million pixels, which PIL
            # merely warns about: about 3 GB of buffers here before the data runs out
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if exif_turned(im):
                    im = ImageOps.exif_transpose(im)
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # convert() would clip 16-bit grey, not scale it
                    im = _grey_to_8bit(im, path)
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                rgb = im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot read image {path}: {e} (Pillow's guard; to read such an image, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS in Python first)") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def _grey_to_8bit(im, path: Path):
    """A 16-bit greyscale image (or 32-bit integer pixels within 16 bits) scaled from the
    16-bit range to 8 bits (a 12-bit scan comes out dark: its range is not recorded)."""
    from PIL import Image  # noqa: PLC0415

    arr = np.asarray(im)
    if im.mode == "F" or arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"cannot read image {path}: {im.mode} pixels in [{arr.min()}, {arr.max()}] have no known "
                         "range; save it with 8 or 16 bits per channel")
    return Image.fromarray((arr.astype(np.float32) / 257).round().astype(np.uint8), "L")


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


FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SUFFIXES: dict[str, frozenset[str]] = {
    "image": frozenset(FRAME_EXTENSIONS),
    "audio": frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff"}),
    "video": frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"}),
}
"""File suffixes (lower case) read as each modality."""


def suffix_modality(path: str | os.PathLike) -> str | None:
    """The modality a file name's suffix stands for (:data:`SUFFIXES`), ``None`` for another suffix."""
    suffix = Path(path).suffix.lower()
    return next((m for m, suffixes in SUFFIXES.items() if suffix in suffixes), None)


def modality_of(path: str | os.PathLike, unknown: str | None = None) -> str:
    """``"image"``, ``"audio"`` or ``"video"`` for a media file by its suffix; a folder
    of frame images (see :func:`is_frame_folder`) is a video; a suffix not in
    :data:`SUFFIXES` gives ``unknown`` when that is set (the reader then decides).

    Raises:
        ValueError: a missing path, a folder that is not a clip, or an unknown suffix
            when ``unknown`` is ``None``.
    """
    p = Path(path)
    if p.is_dir():
        if is_frame_folder(p):
            return "video"
        raise ValueError(f"{p} is a directory, not a media file (nor a folder of video frames: those hold an fps.txt, "
                         f"or at least {MIN_NUMBERED_FRAMES} frames numbered in name order); pass the files in it, or add "
                         "an fps.txt (the frame rate) to read it as one video")
    if not p.exists():
        raise ValueError(f"file not found: {p}")
    kind = suffix_modality(p) or unknown
    if kind is not None:
        return kind
    known = ", ".join(sorted(set().union(*SUFFIXES.values())))
    convert = (f" (AAC and WMA are not read: convert it first, e.g. ffmpeg -i {p.name} {p.stem}.flac)"
               if p.suffix.lower() in (".m4a", ".aac", ".wma") else "")
    raise ValueError(f"{p}: unknown media suffix {p.suffix!r}{convert}; known: {known}")
MIN_NUMBERED_FRAMES = 8
"""Numbered images a folder needs, without an ``fps.txt``, to be found as a clip."""


def _frame_files(path: Path) -> list[Path]:
    return sorted(c for c in path.iterdir() if c.suffix.lower() in FRAME_EXTENSIONS and c.is_file())


def is_frame_folder(path: str | os.PathLike) -> bool:
    """Whether a folder holds one video as frame images, for finding clips in a data tree.

    It does when it holds at least one frame image and an ``fps.txt``, or at least
    :data:`MIN_NUMBERED_FRAMES` frame images whose names, in name order, are one prefix
    followed by consecutive numbers (``0000.png``, ``0001.png``, ... or
    ``frame_007.jpg``, ``frame_008.jpg``, ...; unpadded ``frame_9``, ``frame_10`` fail,
    as name order, the order frames are read in, is not frame order). A folder of photos
    (``IMG_0012.jpg``, ``IMG_0040.jpg``, ``beach.jpg``) is not a clip. :func:`load_video`
    reads any folder of frames it is given, whether or not it passes this test.
    """
    p = Path(path)
    if not p.is_dir():
        return False
    files = _frame_files(p)
    if files and (p / "fps.txt").is_file():
        return True
    if len(files) < MIN_NUMBERED_FRAMES:
        return False
    names = [re.fullmatch(r"(.*?)(\d+)", f.stem) for f in files]
    if not all(names) or len({m[1] for m in names}) != 1:
        return False
    numbers = [int(m[2]) for m in names]
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


class AssumedFrameRateWarning(UserWarning):
    """A folder of frames without an ``fps.txt`` was read at 25 frames per second."""


def _load_frame_folder(path: Path, max_frames: int | None, max_pixels: int | None) -> tuple[Tensor, float]:
    files = _frame_files(path)[:max_frames]
    if not files:
        raise ValueError(f"video folder {path} holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
    w, h, _ = image_header(files[0])
    check_pixels(path, w, h, max_pixels, "'s frames")
    frames = [load_image(f) for f in files]
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"frames in {path} differ in size: {sorted({tuple(f.shape) for f in frames})}")
    fps_file = path / "fps.txt"
    fps = 25.0
    if fps_file.is_file():
        text = fps_file.read_bytes().decode("utf-8", "replace").strip()
        try:
            fps = float(text)
        except ValueError:
            fps = math.nan
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"{fps_file} must hold the frame rate, a positive number such as 25, got {text[:40]!r}")
    else:
        warnings.warn(f"{path} has no fps.txt: its frames are taken as 25 per second; write the rate "
                      f"into {fps_file} (e.g. 30) if it is another", AssumedFrameRateWarning, stacklevel=3)
    return torch.stack(frames), fps


def load_video(path: str | os.PathLike, max_frames: int | None = None,
               max_pixels: int | None = None) -> tuple[Tensor, float]:
    """Decode a video to ``(T, 3, H, W)`` float32 in [0, 1] and its frame rate.

    ``path`` is a video file (through PyAV) or a folder of frame images sorted by name
    (an optional ``fps.txt`` there gives the rate; 25 otherwise, with a warning), any such folder: the
    stricter :func:`is_frame_folder` only decides which folders a data tree's listing
    takes for clips.

    ``max_pixels`` refuses frames larger than that (``None``: no limit), from the
    container's header or the first frame's, before anything is decoded. A display matrix
    (a phone's portrait recording) is applied, as players do: the frames come upright, and
    the recorded size is the upright one; an alpha channel is composited on white, as a
    photo's is (:mod:`tokenizers_vq.video_io`).

    Raises:
        ValueError: missing, unreadable or cut-short file, no video stream (cover art is
            not one) or frames, frames of different sizes (in a folder or a stream), frames
            over ``max_pixels``.
    """
    if Path(path).is_dir():
        return _load_frame_folder(Path(path), max_frames, max_pixels)
    frames, fps, _, _ = read_video_file(Path(path), max_frames, max_pixels)
    return frames.permute(0, 3, 1, 2).float().div_(255), fps


def load_input(
    path: str | os.PathLike, modality: str, sample_rate: int | None = None, max_frames: int | None = None,
    max_pixels: int | None = MAX_PIXELS,
) -> tuple[Tensor, list[int], dict[str, Any]]:
    """Read a media file as a tokenizer's input, with what a token file records of it.

    Args:
        modality: ``"image"``, ``"audio"`` or ``"video"``.
        sample_rate: audio: the model's rate (the file is resampled to it).
        max_frames: video: read at most this many frames (``None``: all).
        max_pixels: images and video frames: refuse more than this many pixels
            (``None``: no limit); checked from the file's header, before it is decoded.

    Returns:
        ``(x, size, info)``: ``x`` is image ``(3, H, W)`` or video ``(3, T, H, W)`` in
        [-1, 1], or audio ``(1, T)`` mixed to mono at ``sample_rate``; ``size`` is
        ``[H, W]``, ``[T]`` or ``[T, H, W]``; ``info`` holds the source's ``channels``,
        for audio ``sample_rate`` (the rate of ``x``) and ``source_sample_rate`` (the
        file's), for video ``fps`` (and ``pixel_aspect`` for non-square pixels).

    Raises:
        ValueError: an unknown modality, or a file the reader refuses (missing,
            unreadable, truncated, zero-length audio, ...), named in the message.
    """
    from tokenizers_vq.modality import get  # noqa: PLC0415  (it builds on this module)

    return get(modality).load(path, sample_rate, max_frames, max_pixels)


def uncoded_parts(modality: str, files) -> list[str]:
    """What a tokenizer of ``modality`` leaves out of ``files``, a sentence each: a video's
    sound, the frames after the first of an animated image (GIF, WebP, PNG)."""
    from PIL import Image  # noqa: PLC0415

    notes = []
    for f in map(Path, files):
        if modality == "video" and has_audio_track(f):
            notes.append(f"{f} also has sound, which a video model does not code: the decoded video is silent")
        elif modality == "image" and f.is_file():
            with warnings.catch_warnings():  # a size warning: the reader has had its say
                warnings.simplefilter("ignore")
                try:
                    with Image.open(f) as im:  # animations only: a phone's JPEG (MPO) holds 2 pictures
                        animated = im.format in ("GIF", "PNG", "WEBP") and getattr(im, "is_animated", False)
                        frames = im.n_frames if animated else 1
                except OSError:
                    frames = 1
            if frames > 1:
                notes.append(f"{f} is an animation of {frames} frames, and an image model codes the first only: "
                             f"to code them all, convert it to a video (ffmpeg -i {f.name} clip.mp4) for --model video")
    return notes


def list_media(folder: str | Path, modality: str, max_items: int = 0) -> list[Path]:
    """Sorted media files of a modality under ``folder`` (recursively); for video,
    ``folder`` or any folder below it that holds one clip as frame images counts as a
    clip too: one with an ``fps.txt``, or with at least
    :data:`MIN_NUMBERED_FRAMES` consecutively numbered frames (see
    :func:`~tokenizers_vq.media.is_frame_folder`), so a folder of photos is not a video."""
    root = Path(folder)
    if root.is_file():
        raise ValueError(f"{root} is a file, not a folder: give the folder that holds the media files "
                         "(tvq encode takes single files)")
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES[modality] and p.is_file())
    if modality == "video":
        files = sorted(files + [p for p in [root, *root.rglob("*")] if is_frame_folder(p)])
    if not files:
        raise ValueError(f"no {modality} files ({', '.join(sorted(SUFFIXES[modality]))}) under {root}")
    return files[:max_items] if max_items else files


def media_in_folder(folder: str | Path, skip: set[Path] | None = None) -> dict[str, int] | None:
    """What a data folder holds, by modality: ``image`` photos (images outside the frame
    folders of clips), ``audio`` files, ``video`` files and frame folders; ``None`` when
    ``folder`` is not a folder. Paths under a resolved folder of ``skip`` are not counted."""
    root = Path(folder).resolve()
    if not root.is_dir():
        return None
    found: dict[str, list[Path]] = {m: [] for m in SUFFIXES}
    for p in root.rglob("*"):  # paths under the resolved root: compared with the resolved folders of skip
        if skip and not skip.isdisjoint((p, *p.parents)):
            continue
        kind = suffix_modality(p)
        if kind is not None and p.is_file():
            found[kind].append(p)
    clips = {d for d in {p.parent for p in found["image"]} if is_frame_folder(d)}
    photos = sum(p.parent not in clips for p in found["image"])
    return {"image": photos, "audio": len(found["audio"]), "video": len(found["video"]) + len(clips)}


def left_out(folder: str | Path, modality: str, skip: set[Path] | None = None) -> list[str]:
    """Notes (one line each) naming the media of other modalities in a data folder, which a
    run with a ``modality`` model leaves out: a mixed folder is not coded whole."""
    from tokenizers_vq.modality import get  # noqa: PLC0415

    notes = []
    for kind, n in (media_in_folder(folder, skip) or {}).items():
        if n and kind != modality:
            what = {"image": "photo", "audio": "audio file", "video": "video clip"}[kind] + ("s" if n > 1 else "")
            notes.append(f"tvq: note: {folder} also holds {n} {what}, left out: this run takes its {modality} files; "
                         f"run again with --model {get(kind).default_model} for those")
    return notes
