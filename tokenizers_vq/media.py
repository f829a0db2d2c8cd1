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

import torch
from torch import Tensor

from tokenizers_vq.audio_io import MIN_SAMPLE_RATE, load_audio, save_audio  # noqa: F401 (this module's API)
from tokenizers_vq.image_io import exif_turned, image_header, load_image, load_image_u8, save_image  # noqa: F401 (API)
from tokenizers_vq.errors import named_path
from tokenizers_vq.io import MAX_FPS, MIN_FPS, TAR_SUFFIXES, check_pixels, shell_arg
from tokenizers_vq.video_io import (  # noqa: F401 (this module's API)
    has_audio_track,
    quarter_turns,
    read_video_file,
    save_video,
    video_turned,
)


class DefaultLimit(int):
    """A pixel limit that was not chosen by the caller (the modality may size its own); the
    same number given explicitly is a plain ``int`` and applies as given."""


MAX_PIXELS = DefaultLimit(4096 * 4096)
"""Default largest image (in pixels, H x W) that :func:`~tokenizers_vq.media.load_input`
reads for a tokenizer: the embedded f16 model asked for 25.6 GB at 10000 x 10000 pixels
on a CPU, and memory grows linearly with the pixel count (about 4 GB at this limit). Raise it with ``max_pixels=`` or
``tvq encode --max-pixels``."""

MAX_VIDEO_PIXELS = 1920 * 1088
"""What the default :data:`MAX_PIXELS` stands for with video frames (1080p, either way up):
the embedded video model's encoder took 8.2 GB and its decoder 12.0 GB for a 17-frame
1080p clip on a CPU (720p: 4.2 and 5.5 GB), with its full-resolution layers run a few
frames at a time (:data:`tokenizers_vq.backbones.time_chunks.CHUNK_PIXELS`). A ``max_pixels`` the
caller sets applies as given, the same number as :data:`MAX_PIXELS` included."""


def bundled_photo() -> Path:
    """A real photograph shipped with an installed dependency (matplotlib's
    ``grace_hopper.jpg``, 512x600), for demos and examples."""
    import matplotlib  # noqa: PLC0415

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"matplotlib's sample photo is missing at {path}; pass your own image file")
    return path


FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
SUFFIXES: dict[str, frozenset[str]] = {
    "image": frozenset(FRAME_EXTENSIONS),
    "audio": frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".caf"}),
    "video": frozenset({".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm"}),
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
    p = named_path(path)
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


def _numbered(files: list[Path]) -> list[re.Match | None]:
    """Per file, its name split into a prefix and a number (``frame_007``: ``frame_``, ``007``), or None."""
    return [re.fullmatch(r"(.*?)(\d+)", f.stem) for f in files]


def _frame_files(path: Path) -> list[Path]:
    """A folder's frame images in frame order: by number where every name is one prefix and a
    number (``frame_9`` before ``frame_10``), else in name order."""
    files = sorted(c for c in path.iterdir() if c.suffix.lower() in FRAME_EXTENSIONS and c.is_file())
    names = _numbered(files)
    if files and all(names) and len({m[1] for m in names}) == 1:
        return [f for _, f in sorted(zip((int(m[2]) for m in names), files), key=lambda nf: nf[0])]
    return files


def _strays(files: list[Path]) -> list[Path]:
    """Images among a clip's frames not numbered as most of them are (one prefix and a
    number): a cover picture or a note would otherwise be read as a frame."""
    names = _numbered(files)
    prefixes = [m[1] for m in names if m]
    if not prefixes:
        return []  # none numbered: name order is frame order
    usual = max(sorted(set(prefixes)), key=prefixes.count)  # (ties: the first in name order)
    return [f for f, m in zip(files, names) if not m or m[1] != usual]


def is_frame_folder(path: str | os.PathLike) -> bool:
    """Whether a folder holds one video as frame images, for finding clips in a data tree.

    It does when it holds at least one frame image and an ``fps.txt``, or at least
    :data:`MIN_NUMBERED_FRAMES` frame images whose names, in name order, are one prefix
    followed by consecutive numbers (``0000.png``, ``0001.png``, ... or
    ``frame_9.jpg``, ``frame_10.jpg``, ...: frames are read in number order). A folder of photos
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
    names = _numbered(files)
    if not all(names) or len({m[1] for m in names}) != 1:
        return False
    numbers = sorted(int(m[2]) for m in names)
    return numbers == list(range(numbers[0], numbers[0] + len(numbers)))


class AssumedFrameRateWarning(UserWarning):
    """A folder of frames without an ``fps.txt`` was read at 25 frames per second."""


def _load_frame_folder(path: Path, max_frames: int | None, max_pixels: int | None) -> tuple[Tensor, float]:
    files = _frame_files(path)
    if not files:
        raise ValueError(f"video folder {path} holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
    strays = _strays(files)
    if strays:
        raise ValueError(f"video folder {path}: {', '.join(f.name for f in strays[:3])} "
                         f"{'is' if len(strays) == 1 else 'are'} not numbered as its other frames are "
                         f"(e.g. {next(f for f in files if f not in strays).name}); move "
                         f"{'it' if len(strays) == 1 else 'them'} out of the clip's folder")
    files = files[:max_frames]
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
        if not (math.isfinite(fps) and MIN_FPS <= fps <= MAX_FPS):
            raise ValueError(f"{fps_file} must hold the frame rate, a number from 1/1001 to {MAX_FPS:,} such as 25, got {text[:40]!r}")
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
            (``None``: none of ours, Pillow's guard for images); from the header, before decoding.

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
    sound, the frames after the first of an animated image (GIF, WebP, PNG), the pages after the
    first of a TIFF."""
    from PIL import Image  # noqa: PLC0415

    notes = []
    for f in map(Path, files):
        if modality == "video" and has_audio_track(f):
            notes.append(f"{f} also has sound, which a video model does not code: the decoded video is silent")
        elif modality == "image" and f.is_file():
            with warnings.catch_warnings():  # a size warning: the reader has had its say
                warnings.simplefilter("ignore")
                try:  # animations and pages (a phone's JPEG, MPO, holds 2 pictures: not one of them)
                    with Image.open(f) as im:
                        fmt, frames = im.format, getattr(im, "n_frames", 1) if im.format in ("GIF", "PNG", "WEBP", "TIFF") else 1
                except (OSError, Image.DecompressionBombError):
                    fmt, frames = None, 1
            if frames > 1:
                what, fix = ((f"holds {frames} pages", "save each page as a file of its own") if fmt == "TIFF" else
                             (f"is an animation of {frames} frames", f"convert it to a video (ffmpeg -i {shell_arg(f.name)} "
                                                                     "clip.mp4) for --model video"))
                notes.append(f"{f} {what}, and an image model codes the first only: to code them all, {fix}")
    return notes


def walk(root: Path, skip: set[Path] | None = None) -> list[Path]:
    """Every path under the folder ``root``, following links to folders (each real folder once:
    a link back up is not followed round); folders whose real path is in ``skip`` (resolved
    paths) are left out with all they hold. A subfolder that cannot be read is named in a
    warning (its files are left out).

    Raises:
        ValueError: ``root`` itself cannot be read."""
    out, seen, todo = [], {os.path.realpath(root)}, [root]
    while todo:
        folder = todo.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError as e:
            if folder == root:
                raise ValueError(f"cannot read the folder {folder} ({e.strerror})") from None
            warnings.warn(f"cannot read the folder {folder} ({e.strerror}): its files are left out; make it "
                          "readable, or move it out of the data folder", stacklevel=3)
            continue
        for p in entries:
            real = os.path.realpath(p)
            if skip and Path(real) in skip:
                continue
            out.append(p)
            if p.is_dir() and real not in seen:
                seen.add(real)
                todo.append(p)
    return out


def list_media(folder: str | Path, modality: str, max_items: int = 0) -> list[Path]:
    """Sorted media files of a modality under ``folder`` (recursively); for video,
    ``folder`` or any folder below it that holds one clip as frame images counts as a
    clip too: one with an ``fps.txt``, or with at least
    :data:`MIN_NUMBERED_FRAMES` consecutively numbered frames (see
    :func:`~tokenizers_vq.media.is_frame_folder`), so a folder of photos is not a video."""
    root = Path(folder)
    if root.is_file():
        name, tar = root.name.lower(), f"tvq encode and export read tar shards; here extract it: mkdir DIR && tar -xf {shell_arg(root)} -C DIR"
        why = tar if name.endswith(TAR_SUFFIXES) else "tar shards are read when named .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz" \
            if any(a in name for a in (".tar", ".zip", ".zst", ".7z")) else "tvq encode takes single files"
        raise ValueError(f"{root} is a file, not a folder: give the folder that holds the media files ({why})")
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    tree = walk(root)
    files = sorted(p for p in tree if p.suffix.lower() in SUFFIXES[modality] and p.is_file())
    if modality == "video":
        files = sorted(files + [p for p in [root, *tree] if is_frame_folder(p)])
    if not files:
        raise ValueError(f"no {modality} files ({', '.join(sorted(SUFFIXES[modality]))}) under {root}")
    return files[:max_items] if max_items else files


def media_in_folder(folder: str | Path, skip: set[Path] | None = None) -> dict[str, int] | None:
    """What a data folder holds, by modality: ``image`` photos (images outside the frame
    folders of clips), ``audio`` files, ``video`` files and frame folders; ``None`` when
    ``folder`` is not a folder. Paths under a resolved folder of ``skip`` are not counted."""
    held = _held(folder, skip)
    return None if held is None else _counts(*held)


def _counts(found: dict[str, list[Path]], clips: set[Path]) -> dict[str, int]:
    photos = sum(p.parent not in clips for p in found["image"])
    return {"image": photos, "audio": len(found["audio"]), "video": len(found["video"]) + len(clips)}


def _held(folder: str | Path, skip: set[Path] | None) -> tuple[dict[str, list[Path]], set[Path]] | None:
    """A folder's media files by modality, and its frame folders (clips)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        return None
    found: dict[str, list[Path]] = {m: [] for m in SUFFIXES}
    for p in walk(root, {Path(os.path.realpath(d)) for d in skip or ()}):
        kind = suffix_modality(p) or ("other" if p.suffix.lower() in UNREAD_SUFFIXES else None)
        if kind is not None and p.is_file():
            found.setdefault(kind, []).append(p)
    return found, {d for d in {p.parent for p in found["image"]} if is_frame_folder(d)}


UNREAD_SUFFIXES = frozenset({".m4a", ".aac", ".wma", ".heic", ".avif", ".wmv", ".flv", ".mpg", ".mpeg", ".3gp"})
"""Suffixes of media this library does not read (a data folder's files of these are named)."""


def left_out(folder: str | Path, modality: str, skip: set[Path] | None = None,
             rerun: str = "run again with --model {model}") -> list[str]:
    """Notes (one line each) naming the media of other modalities in a data folder, which a
    run with a ``modality`` model leaves out: a mixed folder is not coded whole. ``rerun``
    says how to take them (``{model}``: the embedded model of their kind, ``{kind}`` it)."""
    from tokenizers_vq.modality import get  # noqa: PLC0415

    notes = []
    found, clips = _held(folder, skip) or ({}, set())
    other = found.get("other", [])
    if other:
        kinds = sorted({p.suffix.lower() for p in other})
        notes.append(f"tvq: note: {folder} holds {len(other)} file{'s' * (len(other) > 1)} of a type this library does "
                     f"not read ({', '.join(kinds)}), left out: convert them first (e.g. ffmpeg -i {shell_arg(other[0].name)} "
                     f"{shell_arg(other[0].stem)}.flac for sound, .mp4 for video, .png for pictures)")
    held = _counts(found, clips) if found else {}
    if modality == "image" and clips:  # the frames of a frame folder are images: coded as photos
        held["video"] = len(found["video"])
        notes.append(f"tvq: note: {folder} holds {len(clips)} folder{'s' * (len(clips) > 1)} of numbered frames "
                     f"(video clips?), whose frames are coded as photos; "
                     f"{rerun.format(model=get('video').default_model, kind='video')} to code them as clips")
    for kind, n in held.items():
        if n and kind != modality:
            what = {"image": "photo", "audio": "audio file", "video": "video clip"}[kind] + ("s" if n > 1 else "")
            notes.append(f"tvq: note: {folder} also holds {n} {what}, left out: this run takes its {modality} files; "
                         f"{rerun.format(model=get(kind).default_model, kind=kind)} for those")
    return notes


REPORT_FILES = frozenset({"report.md", "metrics.json", "codebook_usage.png"})
"""The files that mark a folder as a ``tvq eval`` report's."""


def outputs_under(folder: str | Path) -> set[Path]:
    """Resolved folders below ``folder`` that hold a training run (its ``metrics.jsonl`` or ``checkpoint/``),
    a token prior (``prior_config.json``) or a ``tvq eval`` report (:data:`REPORT_FILES`): their pictures are not data."""
    root, found = Path(folder).resolve(), set()
    for d, dirs, names in os.walk(root) if root.is_dir() else ():
        if Path(d) != root and ({"metrics.jsonl", "prior_config.json"} & set(names) or "checkpoint" in dirs
                                or REPORT_FILES <= set(names)):
            found.add(Path(d))
            dirs.clear()
    return found
