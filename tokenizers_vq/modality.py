"""One class per kind of media, registered by name: what the rest of the library asks
instead of comparing modality strings.

A :class:`Modality` owns the facts of its media: the file suffixes read as it, the shape
of a model input, how a file becomes a model input and a decoded tensor becomes media
again (and a file), the padding to a backbone's stride and the token grid that follows,
and the embedded model that ``tvq`` picks for it. :func:`get` looks one up by the name a
:class:`~tokenizers_vq.tokenizer_config.TokenizerConfig` carries.

    >>> get("audio").default_model, get("video").input_ndim, get("image").output_suffix
    ('speech', 5, '.png')
    >>> get("image").grid((600, 512), stride=(16, 16))
    (38, 32)
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenizers_vq.audio_io import read_audio
from tokenizers_vq.errors import ItemError
from tokenizers_vq.media import (
    MAX_VIDEO_PIXELS,
    AssumedFrameRateWarning,
    DefaultLimit,
    SUFFIXES,
    check_pixels,
    image_header,
    load_audio,
    load_image,
    load_image_u8,
    load_video,
    read_video_file,
    save_audio,
    save_image,
    save_video,
)
from tokenizers_vq.io import shell_arg


LOUD_INPUT = 1.5
"""Audio samples above this (3.5 dB over full scale: more than a lossy decoder's overshoot) are
named in a warning; the decoded audio is clipped to [-1, 1]."""

INPUT_LIMIT = 4.0
"""Model inputs are in [-1, 1]; one reaching past this magnitude is refused (8-bit pixels or
16-bit samples passed as floats), not coded into tokens of nothing."""


class Modality(ABC):
    """A kind of media. Model space: images ``(B, 3, H, W)`` and video ``(B, 3, T, H, W)``
    in [-1, 1], audio ``(B, 1, T)``; media space (what :meth:`to_media` gives and
    :meth:`save` writes): image ``(3, H, W)`` and video ``(T, 3, H, W)`` in [0, 1], audio
    ``(1, T)`` in [-1, 1]."""

    name: ClassVar[str]
    article: ClassVar[str]  # "an image": for messages
    input_ndim: ClassVar[int]  # axes of a batch of model inputs
    layout: ClassVar[str]  # their order, as error messages name it
    has_pixels: ClassVar[bool]  # frames of at least 8x8 pixels
    output_suffix: ClassVar[str]  # what decoded media is written as
    default_model: ClassVar[str]  # the embedded model tvq picks for it
    region_cells: ClassVar[int | None]  # latent cells of a dynamic-length region (None: not offered)
    unit: ClassVar[str]  # what rates count: "images", "audio_seconds", "frames"
    token_rate: ClassVar[str]  # the summary's tokens-per-unit key
    streams: ClassVar[bool]  # long items coded in overlapping chunks, and streamed (position-wise quantizers only)
    clips: ClassVar[bool]  # long items coded in clips of 1 + k * temporal_factor frames
    fid: ClassVar[bool]  # rFID (Inception features of whole items) is measured
    window_axes: ClassVar[int]  # axes a token prior's square window spans (time; a picture's rows and columns)
    optional_metrics: ClassVar[tuple[tuple[str, str, str], ...]] = ()  # (summary key, name, package) of
    # the per-item metrics that need an optional package
    input_scale: ClassVar[str] = "pixels scaled to [-1, 1] (8-bit: x / 127.5 - 1)"  # for messages

    @staticmethod
    def input_range(x: Tensor) -> Tensor:
        """``(B, 2)``: each item's ``(min, max)`` of a batch ``(B, ...)`` (NaN carries through
        both), for :meth:`check_range`. Two reductions: ``aminmax(dim=1)`` is 17x slower on the
        CPU (0.82 vs 0.05 ms for one photo)."""
        flat = x.detach().flatten(1)  # (in fp32: a CPU bf16 autocast region refuses to stack fp16)
        return torch.stack([flat.amin(1).float(), flat.amax(1).float()], dim=1)

    def check_range(self, lo_hi: Tensor) -> None:
        """Raise :class:`~tokenizers_vq.errors.ItemError` unless each row ``(min, max)`` of a batch
        of model inputs (``(B, 2)``, :meth:`input_range`) is finite and within :data:`INPUT_LIMIT`."""
        rows = lo_hi.tolist()
        for i, (lo, hi) in enumerate(rows):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ItemError(f"{self.name} input contains NaN or Inf", i, len(rows))
            if max(-lo, hi) > INPUT_LIMIT:
                raise ItemError(f"{self.name} input values reach [{lo:.4g}, {hi:.4g}]; the tokenizer takes {self.input_scale}",
                                i, len(rows))

    @property
    def suffixes(self) -> frozenset[str]:
        """File suffixes (lower case) read as this modality."""
        return SUFFIXES[self.name]

    @abstractmethod
    def load(self, path: str | os.PathLike, sample_rate: int | None = None, max_frames: int | None = None,
             max_pixels: int | None = None) -> tuple[Tensor, list[int], dict[str, Any]]:
        """A file as a model input ``x`` (no batch axis), its ``size`` and ``info``
        (see :func:`~tokenizers_vq.media.load_input`)."""

    @abstractmethod
    def load_media(self, path: str | os.PathLike, sample_rate: int | None = None,
                   max_frames: int | None = None) -> Tensor:
        """A file as media (the original beside which a reconstruction is measured)."""

    def load_reference(self, path: str | os.PathLike, sample_rate: int | None = None,
                       max_frames: int | None = None) -> tuple[Tensor, float]:
        """A file as an evaluation compares it, with its rate: image ``(3, H, W)`` and
        video ``(T, 3, H, W)`` in [0, 1], mono audio ``(T,)`` at ``sample_rate``; the rate
        is that sample rate or the video's frame rate (0 for images)."""
        return self.load_media(path, sample_rate, max_frames), 0.0

    def units(self, media: Tensor, sample_rate: int | None = None) -> float:
        """How many :attr:`unit` one item of media holds."""
        return 1.0

    def pixels(self, media: Tensor) -> int:
        """Pixels of one item of media (0 for audio)."""
        return 0

    def seconds(self, media: Tensor, rate: float) -> float:
        """Duration of one item of media at ``rate`` samples or frames per second (0 for images)."""
        return 0.0

    def load_compact(self, path: str | os.PathLike, sample_rate: int | None = None, max_frames: int | None = None,
                     max_pixels: int | None = None) -> tuple[Tensor, list[int], dict[str, Any]]:
        """As :meth:`load`, with ``x`` in the most compact form that :meth:`expand` turns
        into the model input bit for bit (images: uint8 pixels): what the export's loader
        workers send, a quarter of the bytes for images."""
        return self.load(path, sample_rate, max_frames, max_pixels)

    def expand(self, x: Tensor) -> Tensor:
        """A batch of :meth:`load_compact` inputs (on any device) as model input."""
        return x

    @abstractmethod
    def to_media(self, out: Tensor) -> Tensor:
        """One decoded item (model space, no batch axis) as media."""

    @abstractmethod
    def save(self, media: Tensor, path: str | os.PathLike, sample_rate: int | None, info: dict[str, Any]) -> Path:
        """Write media (as :meth:`to_media` gives it), atomically."""

    def pad(self, x: Tensor, stride: tuple[int, ...]) -> Tensor:
        """Pad the trailing axes of a batch up to multiples of ``stride`` (one per axis
        from the last; replicate for pixels, zeros for audio)."""
        pad = []
        for axis, s in zip(range(x.ndim - 1, x.ndim - 1 - len(stride), -1), reversed(stride)):
            pad += [0, -x.shape[axis] % s]
        if not any(pad):
            return x
        if not self.has_pixels:
            return F.pad(x, pad)
        return F.pad(x, pad + [0, 0] * (x.ndim - 2 - len(stride)), mode="replicate")  # replicate pads every axis

    def check_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """``size`` as whole numbers: the media's own axes (``(H, W)``, ``(T,)`` or
        ``(T, H, W)``: as many as a model input has after ``(B, C)``), each at least 1;
        audio takes a bare sample count too.

        Raises:
            ValueError: another count of axes, or a value that is not a positive whole number.
        """
        axes = self.input_ndim - 2
        if axes == 1 and not isinstance(size, bool):  # audio: a bare sample count as well as (T,)
            try:
                size = (operator.index(size),)
            except TypeError:
                pass
        try:
            vals = tuple(operator.index(s) for s in size)
        except TypeError:
            vals = ()
        if len(vals) != axes or min(vals, default=0) < 1:
            names = {1: "(T,): samples", 2: "(H, W)", 3: "(T, H, W)"}[axes]
            shown = tuple(size) if isinstance(size, (list, tuple)) else size  # (a bare number: not iterable)
            raise ValueError(f"size {shown!r}: {self.article} is sized {names}, each a whole number >= 1")
        return vals

    def check_codes(self, codes: Tensor, code_shape: tuple[int, ...], size: Sequence[int] | None,
                    grid: tuple[int, ...] | None, model: str, packed: bool = False) -> None:
        """Refuse fixed-grid codes without their batch axis ``(B, *grid, *code_shape)``, or
        whose grid is not the ``grid`` that ``model`` gives media of ``size`` (``packed``: a
        dynamic-length model's :class:`PackedCodes`, whose shape is the grid)."""
        if not isinstance(codes, Tensor) and not packed:
            raise ValueError(f"decode takes a torch.Tensor of codes (torch.as_tensor(...)), got {type(codes).__name__}")
        axes, shape = self.input_ndim - 2, tuple(codes.shape)
        if not packed and codes.ndim != 1 + axes + len(code_shape):
            raise ValueError(f"codes of shape {list(shape)}: expected (B, *grid, *code_shape), "
                             f"{1 + axes + len(code_shape)} axes (one item's codes: codes[None])")
        if grid is not None and (got := shape if packed else shape[1 : 1 + axes]) != tuple(grid):
            raise ValueError(f"codes of grid {list(got)} do not fit size {list(size)}, which "
                             f"{model!r} codes as {list(grid)}: pass the size the media had")

    def grid(self, size: tuple[int, ...] | list[int], stride: tuple[int, ...]) -> tuple[int, ...]:
        """Latent cells along the trailing axes of ``size`` (as many as ``stride`` has),
        each rounded up; video time is the tokenizer's business (clips)."""
        return tuple(-(-s // st) for s, st in zip(size[len(size) - len(stride):], stride, strict=True))


_REGISTRY: dict[str, Modality] = {}


def register(cls: type[Modality]) -> type[Modality]:
    """Class decorator: make a modality known by its ``name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Modality:
    """The registered modality called ``name`` (``"image"``, ``"audio"``, ``"video"``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; choose from {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


@register
class Image(Modality):
    name, article, input_ndim, has_pixels, layout = "image", "an image", 4, True, "(B, C, H, W)"
    output_suffix, default_model, region_cells = ".png", "image", 4
    unit, token_rate, streams, fid, clips = "images", "tokens_per_image", False, True, False
    window_axes = 2

    def load_media(self, path, sample_rate=None, max_frames=None):
        return load_image(path)

    def pixels(self, media: Tensor) -> int:
        return media.shape[-1] * media.shape[-2]

    def load(self, path, sample_rate=None, max_frames=None, max_pixels=None):
        x, size, info = self.load_compact(path, sample_rate, max_frames, max_pixels)
        return self.expand(x), size, info

    def load_compact(self, path, sample_rate=None, max_frames=None, max_pixels=None):
        limit = "pillow" if max_pixels is None else max_pixels  # (no limit named: Pillow's guard stays)
        w, h, channels = image_header(path, limit) if Path(path).is_file() else (0, 0, 3)
        check_pixels(Path(path), w, h, max_pixels)
        img = load_image_u8(path, limit)
        return img, list(img.shape[1:]), {"channels": channels}

    def expand(self, x: Tensor) -> Tensor:
        return x.float() / 255.0 * 2 - 1 if x.dtype == torch.uint8 else x  # as load_image, then to [-1, 1]

    def to_media(self, out: Tensor) -> Tensor:
        return ((out + 1) / 2).clamp(0, 1)

    def save(self, media, path, sample_rate, info):
        return save_image(media, path)


@register
class Audio(Modality):
    name, article, input_ndim, has_pixels, layout = "audio", "an audio", 3, False, "(B, 1, T)"
    output_suffix, default_model, region_cells = ".wav", "speech", 2
    input_scale = "samples in [-1, 1] (16-bit PCM: x / 32768)"
    unit, token_rate, streams, fid, clips = "audio_seconds", "tokens_per_second", True, False, False
    window_axes = 1
    optional_metrics = (("pesq_wb", "PESQ", "pesq"), ("stoi", "STOI", "pystoi"))

    def load_media(self, path, sample_rate=None, max_frames=None):
        return self.load_reference(path, sample_rate)[0][None]

    def load_reference(self, path, sample_rate=None, max_frames=None):
        wav, sr = load_audio(path, sample_rate, mono=True)
        return wav[0], float(sr)

    def units(self, media: Tensor, sample_rate: int | None = None) -> float:
        return media.shape[-1] / sample_rate

    def seconds(self, media: Tensor, rate: float) -> float:
        return media.shape[-1] / rate

    def load(self, path, sample_rate=None, max_frames=None, max_pixels=None):
        wav, sr, source_rate, channels = read_audio(path, sample_rate, mono=True)
        peak = float(wav.abs().max())  # load_audio refuses a file without samples
        if peak > INPUT_LIMIT:  # a float file's samples may go anywhere; named here, not as a tensor's
            raise ValueError(f"audio file {path}: its samples reach {peak:.3g}, far outside [-1, 1] (a floating-point "
                             f"file out of range); scale it down first, e.g. ffmpeg -i {shell_arg(Path(path).name)} -af "
                             f"volume={-20 * math.log10(peak):.1f}dB out.wav")
        if peak > LOUD_INPUT:
            warnings.warn(f"audio file {path}: its samples reach {peak:.3g}, above full scale (a floating-point file); "
                          f"the decoded audio is clipped to [-1, 1]: scale it down first for a faithful copy, e.g. "
                          f"ffmpeg -i {shell_arg(Path(path).name)} -af volume={-20 * math.log10(peak):.1f}dB out.wav", stacklevel=2)
        return wav, [wav.shape[-1]], {"sample_rate": sr, "source_sample_rate": source_rate, "channels": channels}

    def to_media(self, out: Tensor) -> Tensor:
        return out.clamp(-1, 1)

    def save(self, media, path, sample_rate, info):
        return save_audio(media, path, sample_rate)


@register
class Video(Modality):
    name, article, input_ndim, has_pixels, layout = "video", "a video", 5, True, "(B, C, T, H, W)"
    output_suffix, default_model, region_cells = ".mp4", "video", None
    unit, token_rate, streams, fid, clips = "frames", "tokens_per_frame", False, False, True
    window_axes = 2  # one frame's grid

    def load_media(self, path, sample_rate=None, max_frames=None):
        with warnings.catch_warnings():  # the frames alone: a folder's assumed rate is not used
            warnings.simplefilter("ignore", AssumedFrameRateWarning)
            return load_video(path, max_frames)[0]

    def load_reference(self, path, sample_rate=None, max_frames=None):
        return load_video(path, max_frames)

    def units(self, media: Tensor, sample_rate: int | None = None) -> float:
        return float(media.shape[0])

    def seconds(self, media: Tensor, rate: float) -> float:
        return media.shape[0] / rate

    def pixels(self, media: Tensor) -> int:
        return media.shape[0] * media.shape[-1] * media.shape[-2]

    def load(self, path, sample_rate=None, max_frames=None, max_pixels=None):
        x, size, info = self.load_compact(path, sample_rate, max_frames, max_pixels)
        return self.expand(x), size, info

    def load_compact(self, path, sample_rate=None, max_frames=None, max_pixels=None):
        """Video files as uint8 ``(3, T, H, W)`` (a quarter of the float bytes: a long clip is
        expanded a clip at a time, :func:`~tokenizers_vq.tokens.encode_file`); frame folders
        as the model input."""
        max_pixels = MAX_VIDEO_PIXELS if isinstance(max_pixels, DefaultLimit) else max_pixels  # sized for frames
        if Path(path).is_dir():  # frame images, composited to RGB as photos are
            (frames, fps), channels, aspect = load_video(path, max_frames, max_pixels), 3, None
            x = frames.permute(1, 0, 2, 3).mul_(2).sub_(1)
        else:  # the channels the stream stores (1 grey, 4 with alpha), as a photo's are recorded
            raw, fps, channels, aspect = read_video_file(Path(path), max_frames, max_pixels)
            x = raw.permute(3, 0, 1, 2)
        info = {"fps": fps, "channels": channels}
        if aspect is not None:  # non-square pixels: the decoded video states them as the source did
            info["pixel_aspect"] = list(aspect)
        return x, list(x.shape[1:]), info

    def expand(self, x: Tensor) -> Tensor:
        """uint8 frames as model input, with the float operations of a float read (in place:
        one float copy of a long clip, not three)."""
        return x.float().div_(255).mul_(2).sub_(1) if x.dtype == torch.uint8 else x

    def to_media(self, out: Tensor) -> Tensor:
        return ((out + 1) / 2).clamp(0, 1).permute(1, 0, 2, 3)

    def save(self, media, path, sample_rate, info):
        return save_video(media, path, info.get("fps", 25.0), info.get("pixel_aspect"))

    def pad_time(self, x: Tensor, temporal_factor: int) -> Tensor:
        """Repeat the last frame up to ``1 + k * temporal_factor`` frames."""
        extra = -(x.shape[2] - 1) % temporal_factor
        return F.pad(x, [0, 0, 0, 0, 0, extra], mode="replicate") if extra else x


__all__ = ["Modality", "Image", "Audio", "Video", "get", "names", "register"]
