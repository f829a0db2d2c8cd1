"""Video files in and out through PyAV (imported only when a video is read or written).

Frames come upright (a display matrix applied, turns and mirrors, as ffmpeg shows them), with
an alpha channel composited on white as photos are; cover art (an ``attached_pic`` stream) is
not video. Files are opened by their absolute path, so a name such as ``file:a.mp4`` or
``12:30.mp4`` is that file, never an FFmpeg protocol.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tokenizers_vq.errors import UNREADABLE, MissingDependency
from tokenizers_vq.io import MAX_FPS, MIN_FPS, atomic_write, check_media_file, check_pixels, check_writable, shell_arg


def pyav(what: str):
    """The ``av`` module (PyAV), or :class:`~tokenizers_vq.errors.MissingDependency` naming ``what`` needs it."""
    try:
        import av  # noqa: PLC0415
    except ImportError as e:
        raise MissingDependency(f"{what} needs PyAV: pip install av (or the package's video extra: "
                                "pip install 'tokenizers_vq[video]')") from e
    return av


def _display_matrix(frame) -> tuple[int, ...] | None:
    """The frame's 3x3 display matrix (16.16 fixed point, row-major, as FFmpeg stores it), or None."""
    for side in getattr(frame, "side_data", None) or ():
        kind = getattr(side, "type", None)
        if str(getattr(kind, "name", kind)).upper().endswith("DISPLAYMATRIX") and len(bytes(side)) >= 36:
            return struct.unpack("=9i", bytes(side)[:36])
    return None


def orientation(frame) -> tuple[int, bool]:
    """``(turns, mirror)`` that put a decoded PyAV frame upright as ffmpeg shows it: ``turns``
    quarter turns counter-clockwise (``numpy.rot90``'s count), then a left-right mirror if
    ``mirror``. From the frame's display matrix (a phone's portrait clip is stored on its side, a
    front camera's may be mirrored), read as ffmpeg's autorotation reads it; ``(0, False)`` without
    one or off multiples of 90 degrees."""
    m = _display_matrix(frame)
    if m is None:  # a PyAV without side data: the rotation alone
        angle = float(getattr(frame, "rotation", 0) or 0)
        turns = round(angle / 90)
        return (turns % 4 if abs(angle - 90 * turns) < 1 else 0), False
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0 or scale1 == 0:
        return 0, False
    theta = round(math.degrees(math.atan2(m[1] / scale1, m[0] / scale0)))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:  # clockwise, or the transpose where the matrix mirrors too
        return 3, m[3] > 0
    if abs(theta - 180) < 1:  # a mirror left-right and/or top-bottom
        return {(True, True): (2, False), (True, False): (0, True), (False, True): (2, True)}.get(
            (m[0] < 0, m[4] < 0), (0, False))
    if abs(theta - 270) < 1:
        return 1, m[3] < 0
    return (2, True) if abs(theta) < 1 and m[4] < 0 else (0, False)  # upside down as a mirror


def quarter_turns(frame) -> int:
    """Quarter turns counter-clockwise of :func:`orientation` (odd: the frame is shown on its side)."""
    return orientation(frame)[0]


def upright(pixels: np.ndarray, frame) -> np.ndarray:
    """``(H, W, C)`` pixels of ``frame`` as ffmpeg shows them (:func:`orientation`)."""
    turns, mirror = orientation(frame)
    pixels = np.rot90(pixels, turns)
    return np.ascontiguousarray(pixels[:, ::-1] if mirror else pixels)


def _url(path: str | os.PathLike) -> str:
    """What FFmpeg opens for a local file: its absolute path (a relative name with a colon in it
    would be read as a protocol: ``file:a.mp4`` as ``a.mp4``, ``12:30.mp4`` as protocol ``12``)."""
    return os.path.abspath(os.fspath(path))


def _video_stream(container):
    """The first video stream that is not cover art, or ``None``."""
    av = pyav("reading video")
    return next((s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic), None)


def video_turned(path: str | os.PathLike) -> bool:
    """Whether a video file's first frame has a display matrix that turns or mirrors it (False if unreadable)."""
    av = pyav("reading video")
    try:
        with av.open(_url(path)) as container:
            stream = _video_stream(container)
            frames = container.decode(stream) if stream is not None else iter(())
            return any(orientation(frame) != (0, False) for frame, _ in zip(frames, range(1)))
    except (av.error.FFmpegError, OSError):
        return False


def has_audio_track(path: str | os.PathLike) -> bool:
    """Whether a video file also carries sound (a video tokenizer codes its frames only);
    False for a folder of frames or a file PyAV cannot open."""
    av = pyav("reading video")
    try:
        with av.open(_url(path)) as container:
            return bool(container.streams.audio)
    except (av.error.FFmpegError, OSError):
        return False


def _channels(stream) -> int:
    """Channels the stream stores: 1 grey, 2 grey + alpha, 3 colour, 4 colour + alpha."""
    if not stream.codec_context.pix_fmt:
        return 3
    fmt = pyav("reading video").VideoFormat(stream.codec_context.pix_fmt)
    alpha = any(c.is_alpha for c in fmt.components)
    grey = len(fmt.components) - alpha == 1 and not fmt.has_palette  # a palette's one index is colour
    return (1 if grey else 3) + alpha


def _rgb(frame, alpha: bool) -> np.ndarray:
    """``(H, W, 3)`` uint8, upright; alpha composited on white."""
    if not alpha:
        pixels = frame.to_ndarray(format="rgb24")
    else:
        rgba = frame.to_ndarray(format="rgba").astype(np.uint16)
        a = rgba[..., 3:]
        pixels = ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return upright(pixels, frame)


def _stream_seconds(stream) -> tuple[float | None, float | None]:
    """``(duration, start)`` of a video track in seconds, as its container states them (an MP4
    track's duration counts its edit list; Matroska keeps a ``DURATION`` tag per track);
    ``None`` where not stated: the container's own duration may be another track's."""
    base = stream.time_base
    start = float(stream.start_time * base) if stream.start_time is not None and base else None
    if stream.duration and base:
        return float(stream.duration * base), start
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    try:
        h, m, sec = tag.split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec), start
    except (AttributeError, ValueError):
        return None, start


def read_video_file(path: Path, max_frames: int | None,
                    max_pixels: int | None) -> tuple[Tensor, float, int, tuple[int, int] | None]:
    """``(frames (T, H, W, 3) uint8, fps, channels, pixel_aspect)`` of a video file; see
    :func:`tokenizers_vq.media.load_video`. The rate is the stream's stated one while most
    frame intervals keep it (a cut or a held frame leaves a few odd); frames at another steady
    rate give that rate, and frames at a varying rate their mean rate over their span.
    ``pixel_aspect``: the frames' sample aspect ratio ``(width,
    height)`` of a pixel as shown upright (an anamorphic DVD's 8:9, say), ``None`` for square
    pixels or none stated."""
    check_media_file(path, "video")
    av = pyav("reading video")
    frames, times, durations = [], [], []
    try:
        with av.open(_url(path)) as container:
            stream = _video_stream(container)
            if stream is None:
                cover = " (only cover art)" if container.streams.video else ""
                audio = (f"; it holds audio only: encode it with an audio model after ffmpeg -i {shell_arg(path)} "
                         f"{shell_arg(path.with_suffix('.flac').name)}" if container.streams.audio else "")
                raise ValueError(f"{path} has no video stream{cover}{audio}")
            if stream.codec_context is None:
                raise ValueError(f"cannot read video {path}: this FFmpeg build has no decoder for its video "
                                 "codec; re-encode it: ffmpeg -i IN -c:v libx264 OUT.mp4")
            check_pixels(path, stream.codec_context.width, stream.codec_context.height, max_pixels, "'s frames")
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            if container.duration is None and stream.codec_context.framerate:  # a bare stream: its own rate
                fps = float(stream.codec_context.framerate)
            # the container's aspect first (Matroska, an MP4 pasp box), as ffmpeg shows it
            channels, sar = _channels(stream), stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
            for frame in container.decode(stream):
                if not frames and sar and quarter_turns(frame) % 2:  # a pixel turned on its side
                    sar = 1 / sar
                pixels = _rgb(frame, channels in (2, 4))
                if frames and pixels.shape != frames[0].shape:
                    (h, w), (h0, w0) = pixels.shape[:2], frames[0].shape[:2]
                    raise ValueError(f"{path}: frame {len(frames)} is {w}x{h} pixels, the first {w0}x{h0}; a stream "
                                     "that changes size is not read: re-encode it at one size (ffmpeg -vf scale=W:H)")
                frames.append(torch.from_numpy(pixels))
                times.append(frame.time)
                step = getattr(frame, "duration", None)  # in time_base units, where the container keeps it
                durations.append(float(step * frame.time_base) if step and frame.time_base else None)
                if max_frames is not None and len(frames) >= max_frames:
                    break
            seconds, start = _stream_seconds(stream)
            # an AVI states its frame count in its header; cut short, FFmpeg guesses the duration from its size
            indexed = stream.frames if container.format.name == "avi" else 0
            stated = float(stream.average_rate or 0)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read video {path}: {e} {UNREADABLE}") from e
    if not frames:
        raise ValueError(f"video {path} has no decodable frames")
    if None not in times:  # in presentation order (an AVI's B-frames come stamped out of order)
        times, durations = (list(v) for v in zip(*sorted(zip(times, durations), key=lambda td: td[0])))
    timed = len(times) > 2 and None not in times and times[-1] > times[0]
    if timed:  # most intervals alike (a cut or a held frame leaves a few odd): their rate, else the mean
        steps = np.diff(times)
        typical, mean = float(np.median(steps)), (times[-1] - times[0]) / (len(times) - 1)
        if typical > 0 and np.mean(np.abs(steps / typical - 1) < 0.05) >= 0.8 and abs(mean / typical - 1) < 0.15:
            fps = fps if abs(1 / typical / fps - 1) < 0.05 else 1 / typical
        else:  # a varying rate: the mean over the frames' span keeps the clip's length
            fps = 1 / mean
    # where the frames shown end: the latest frame's end (a last frame held for seconds counts whole)
    ends = [t + d for t, d in zip(times, durations) if t is not None and d]
    stamped = None not in times[:1] + times[-1:]  # (a bare stream's frames have no times)
    first = times[0] if start is None else start
    shown = (max(ends) if ends else times[-1] + 1 / fps) - first if stamped else None
    whole = max_frames is None or len(frames) < max_frames
    # the last frame's place in the header's count (a variable-rate AVI counts its skipped frames too)
    reached = round((times[-1] - first) * stated) + 1 if stamped and stated else len(frames)
    if whole and indexed and reached < 0.9 * indexed - 2:
        raise ValueError(f"cannot read video {path}: the file is cut short (its header counts {indexed} frames, "
                         f"{len(frames)} could be decoded); copy or export it again")
    if whole and seconds and shown is not None and shown < 0.9 * seconds - 2 / fps:
        raise ValueError(f"cannot read video {path}: the file is cut short (its video track lasts {seconds:.2f} s, "
                         f"{len(frames)} frames covering {shown:.2f} s could be decoded); copy or export it again")
    if not MIN_FPS <= fps <= MAX_FPS:  # (no video file is written at such a rate: its tokens could not be decoded)
        raise ValueError(f"video {path} runs at {fps:.6g} frames per second, outside the 1/1001 to {MAX_FPS:,} that "
                         f"video files are written at; re-time its frames first (one a second: ffmpeg -i "
                         f"{shell_arg(path.name)} -vf setpts=N/TB -r 1 {shell_arg(path.stem + '_1fps.mp4')})")
    aspect = (sar.numerator, sar.denominator) if sar and sar > 0 and sar != 1 else None
    return torch.stack(frames), fps, channels, aspect


def to_bytes(frames: Tensor) -> Tensor:
    """Float frames in [0, 1] as uint8 (clamped, rounded), as :func:`save_video` writes them."""
    return (frames.float().clamp(0, 1) * 255).round().byte()


def save_video(frames: Tensor, path: str | os.PathLike, fps: float,
               pixel_aspect: Sequence[int] | None = None) -> Path:
    """Write ``(T, 3, H, W)`` float frames in [0, 1] (or uint8) as H.264 (yuv420p, so H and W are
    cropped to even sizes; BT.601 colours, tagged so) in MP4, MOV or MKV by the suffix
    (:data:`~tokenizers_vq.io.WRITES`), atomically; ``pixel_aspect`` ``(width, height)`` of
    a pixel is stated in the stream (non-square pixels, as the source's were)."""
    check_writable("video", path)
    av = pyav("writing video")
    suffix = Path(path).suffix.lower()
    container_format = {".mkv": "matroska", ".m4v": "mp4"}.get(suffix, suffix[1:])

    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"save_video expects (T, 3, H, W), got shape {tuple(frames.shape)}")
    if not (frames.is_floating_point() or frames.dtype == torch.uint8):
        raise ValueError(f"save_video takes float frames in [0, 1] or uint8 frames, got {frames.dtype}: convert them "
                         "first (frames.to(torch.uint8) for 0-255 values, frames / 255.0 for floats)")
    if frames.shape[0] == 0 or min(frames.shape[2:]) < 2:
        raise ValueError(f"save_video needs at least one frame of at least 2x2 pixels (H.264 codes even sizes), "
                         f"got shape {tuple(frames.shape)}")
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not MIN_FPS <= float(fps) <= MAX_FPS:
        raise ValueError(f"save_video needs a frame rate from 1/1001 to {MAX_FPS:,} frames per second, got fps={fps!r}")
    if pixel_aspect and not (len(pixel_aspect) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in pixel_aspect)):
        raise ValueError(f"pixel_aspect is (width, height) of a pixel as two positive integers, got {pixel_aspect!r}")
    h, w = frames.shape[2] // 2 * 2, frames.shape[3] // 2 * 2
    data = frames[:, :, :h, :w].detach()
    data = (data if data.dtype == torch.uint8 else to_bytes(data)).permute(0, 2, 3, 1).cpu().numpy()

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format=container_format) as container:
            stream = container.add_stream("libx264", rate=Fraction(float(fps)).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if pixel_aspect:
                stream.codec_context.sample_aspect_ratio = Fraction(*map(int, pixel_aspect))
            # the conversion below is BT.601 (limited range): say so, or HD players assume BT.709
            stream.options = {"crf": "18", "color_primaries": "smpte170m", "color_trc": "smpte170m",
                              "colorspace": "smpte170m", "color_range": "tv"}
            for arr in data:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
            container.mux(stream.encode())

    return atomic_write(path, write)
