"""Folders of images, audio or video, decoded once into memory, with random crops.

Batches are drawn by a generator seeded from ``(seed, step, rank)``, so a resumed
run sees exactly the batches the uninterrupted run would have seen, and each rank
of a multi-GPU run sees different data.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from tokenizers_vq.distributed import rank_and_world
from tokenizers_vq.errors import ItemError
from tokenizers_vq.media import list_media, outputs_under
from tokenizers_vq.modality import get as get_modality
from tokenizers_vq.spectral import DEFAULT_MEL_WINDOWS


STILL_MAX_SIDE = 1024
"""Photos panned into video clips are scaled down to this longer side when larger (the video
models train on frames of about 256 pixels)."""


@dataclass(frozen=True)
class CropRange:
    """Pixel crops whose height and width each step draws from :attr:`sides` (``low``,
    ``low + stride``, ... and ``high``), capped by the smallest item of the batch (to the
    largest side that fits, not below ``low``); the batch keeps as many items as come to
    ``batch_size * low**2`` pixels, at least one (so a crop above that, ``high**2 >
    batch_size * low**2``, holds more). The few shapes this makes leave cuDNN few to time
    (``cudnn_benchmark`` times each new shape: over a second a shape for a video model).
    A model trained on one crop size can come to depend on it, decoding frames of other
    sizes with a colour cast."""

    low: int
    high: int
    stride: int = 64

    @property
    def sides(self) -> list[int]:
        return [*range(self.low, self.high, self.stride), self.high]

    def draw(self, gen: torch.Generator) -> tuple[int, int]:
        sides = self.sides
        return tuple(sides[int(torch.randint(0, len(sides), (1,), generator=gen))] for _ in range(2))

    def items(self, batch_size: int, shape: tuple[int, int]) -> int:
        return max(1, round(batch_size * self.low**2 / (shape[0] * shape[1])))

    def cap(self, shape: tuple[int, int], sizes: list[tuple[int, int]]) -> tuple[int, int]:
        fits = [min(size[a] for size in sizes) for a in range(2)]
        return tuple(min(want, max([self.low] + [s for s in self.sides if s <= fit])) for want, fit in zip(shape, fits))


class MediaFolder:
    """In-memory media of one folder.

    Items: images ``(3, H, W)`` uint8, audio ``(T,)`` float16 mono at
    ``sample_rate``, video ``(3, T, H, W)`` uint8 (at most ``max_frames`` frames).

    Video can also learn from photos (``stills``): a still becomes a clip of a camera
    panning across it at a constant whole-pixel speed (:meth:`pan`), so scenes no clip
    shows still come with motion; ``stills_fraction`` of a batch's clips are drawn from them.

    Args:
        files: media files.
        modality: ``"image"``, ``"audio"`` or ``"video"``.
        sample_rate: audio: model rate (files are resampled).
        max_frames: video: frames kept per file.
        stills: video: photos to pan across.
        stills_fraction: video: the chance that a clip of a batch comes from ``stills``.
        max_speed: video: the largest pan, in pixels per frame along each axis.
    """

    def __init__(self, files: list[Path], modality: str, sample_rate: int | None = None, max_frames: int = 120,
                 stills: list[Path] | None = None, stills_fraction: float = 0.5, max_speed: int = 4):
        if stills and modality != "video":
            raise ValueError(f"stills (photos panned into clips) train video models, not {modality} ones: "
                             "leave data.stills empty")
        if stills and not 0 < stills_fraction <= 1:
            raise ValueError(f"stills_fraction={stills_fraction}: expected a share in (0, 1]")
        if max_speed < 0:
            raise ValueError(f"max_speed (data.max_pan) = {max_speed}: expected pixels per frame >= 0")
        self.modality, self.files = modality, files
        self.media = get_modality(modality)
        self.items: list[Tensor] = []
        self.stills: list[Tensor] = []
        self.stills_fraction, self.max_speed = stills_fraction, max_speed
        image = get_modality("image")
        for f in tqdm(stills or [], desc=f"loading {len(stills or [])} stills", leave=False,
                      disable=len(stills or []) < 20):
            photo = image.load_media(f, None, 1)
            if max(photo.shape[1:]) > STILL_MAX_SIDE:  # a camera's 12 MP would hold 36 MB each in memory
                scale = STILL_MAX_SIDE / max(photo.shape[1:])
                size = [max(1, round(n * scale)) for n in photo.shape[1:]]
                photo = F.interpolate(photo[None], size=size, mode="area")[0]
            self.stills.append((photo * 255).round().to(torch.uint8))
        for f in tqdm(files, desc=f"loading {len(files)} {modality} files", leave=False, disable=len(files) < 20):
            media = self.media.load_media(f, sample_rate, max_frames)
            if not self.media.has_pixels and media.numel():  # refused here, naming the file, not at some later step
                try:
                    self.media.check_range(self.media.input_range(media))
                except ItemError as e:
                    raise ValueError(f"{f}: {e.reason}") from None
            if not self.media.has_pixels:  # mono (1, T) -> (T,), kept in fp16
                self.items.append(media[0].to(torch.float16))
            else:  # kept in uint8: images (3, H, W), video (T, 3, H, W) -> (3, T, H, W)
                pixels = (media * 255).round().to(torch.uint8)
                self.items.append(pixels.transpose(0, 1) if pixels.ndim == 4 else pixels)

    def __len__(self) -> int:
        return len(self.items)

    def crop(self, item: Tensor, size: int | tuple[int, int], gen: torch.Generator) -> Tensor:
        """Random ``size`` crop of the last axis (audio) or last two axes (pixels; a side,
        or ``(height, width)``), padding (edge pixels, zeros for audio) where the item is smaller."""
        if not self.media.has_pixels:
            x = item.float()
            if x.shape[-1] < size:
                x = F.pad(x, (0, size - x.shape[-1]))
            start = int(torch.randint(0, x.shape[-1] - size + 1, (1,), generator=gen))
            return x[start : start + size].unsqueeze(0)
        (h, w), (sh, sw) = item.shape[-2:], (size, size) if isinstance(size, int) else size
        top = int(torch.randint(0, max(h - sh, 0) + 1, (1,), generator=gen))
        left = int(torch.randint(0, max(w - sw, 0) + 1, (1,), generator=gen))
        x = item[..., top : top + sh, left : left + sw].float() / 127.5 - 1  # crop first: cheap
        if x.shape[-2] < sh or x.shape[-1] < sw:
            ph, pw = sh - x.shape[-2], sw - x.shape[-1]
            x = F.pad(x.unsqueeze(0) if x.ndim == 3 else x, (0, pw, 0, ph), mode="replicate").squeeze(0)
        if bool(torch.rand((), generator=gen) < 0.5):
            x = x.flip(-1)
        return x

    def clip(self, item: Tensor, frames: int, gen: torch.Generator) -> Tensor:
        """Random run of ``frames`` consecutive frames (the last frame repeated if short)."""
        t = item.shape[1]
        if t < frames:
            item = torch.cat([item, item[:, -1:].expand(-1, frames - t, -1, -1)], dim=1)
            t = frames
        start = int(torch.randint(0, t - frames + 1, (1,), generator=gen))
        return item[:, start : start + frames]

    def pan(self, photo: Tensor, frames: int, size: int | tuple[int, int], gen: torch.Generator) -> Tensor:
        """``(3, H, W)`` uint8 photo -> ``(3, frames, *size)`` in [-1, 1] (a side: square): a ``size``
        window moving by ``(dy, dx)`` whole pixels per frame (each in ``[-max_speed,
        max_speed]``, slowed where the photo is too small for the whole path), from a random
        start that keeps the path inside the photo; flipped left-right at random."""
        sh, sw = (size, size) if isinstance(size, int) else size
        steps = max(frames - 1, 1)
        starts, speeds = [], []
        for side, window in zip(photo.shape[-2:], (sh, sw)):
            room = max(side - window, 0)
            fastest = min(self.max_speed, room // steps)
            v = int(torch.randint(-fastest, fastest + 1, (1,), generator=gen))
            span = abs(v) * (frames - 1)
            first = int(torch.randint(0, room - span + 1, (1,), generator=gen))
            starts.append(first + span if v < 0 else first)
            speeds.append(v)
        (top, left), (dy, dx) = starts, speeds
        clip = torch.stack([photo[:, top + t * dy : top + t * dy + sh, left + t * dx : left + t * dx + sw]
                            for t in range(frames)], dim=1)
        return self.crop(clip, (sh, sw), gen)  # (pads a photo smaller than the window; flips)

    def batch(self, batch_size: int, size: int | CropRange, seed: int, step: int, rank: int = 0,
              frames: int = 17) -> Tensor:
        """The batch of a step: ``(B, 3, size, size)``, ``(B, 1, size)`` or
        ``(B, 3, frames, size, size)``, a pure function of ``(seed, step, rank)``; with a
        :class:`CropRange`, ``(B', 3, [frames,] h, w)`` of the step's crop (``B' <= B``:
        ``batch_size`` items drawn, the crop capped by all of them, the first ``B'`` kept)."""
        gen = torch.Generator().manual_seed(hash((seed, step, rank)) % 2**62)
        drawn = size.draw(gen) if isinstance(size, CropRange) else None
        idx = torch.randint(0, len(self.items), (batch_size,), generator=gen).tolist()
        if drawn is None:  # each item cut as it is drawn
            return torch.stack([self._cut(self._pick(i, gen), size, frames, gen) for i in idx])
        picks = [self._pick(i, gen) for i in idx]
        shape = size.cap(drawn, [tuple((self.stills if still else self.items)[i].shape[-2:]) for still, i in picks])
        return torch.stack([self._cut(p, shape, frames, gen) for p in picks[: size.items(batch_size, shape)]])

    def _pick(self, i: int, gen: torch.Generator) -> tuple[bool, int]:
        """``(a still, its index)`` for a batch slot that drew item ``i``."""
        if self.stills and bool(torch.rand((), generator=gen) < self.stills_fraction):
            return True, int(torch.randint(0, len(self.stills), (1,), generator=gen))
        return False, i

    def _cut(self, pick: tuple[bool, int], shape: int | tuple[int, int], frames: int, gen: torch.Generator) -> Tensor:
        still, i = pick
        if still:
            return self.pan(self.stills[i], frames, shape, gen)
        item = self.items[i]
        return self.crop(self.clip(item, frames, gen) if self.media.clips else item, shape, gen)


def split_files(files: list[Path], val_files: list[Path] | None, val_fraction: float,
                max_items: int = 0) -> tuple[list[Path], list[Path]]:
    """Train and validation files: an explicit validation folder (its files left out of
    training, should it lie inside the training folder), or the last ``val_fraction`` of the
    sorted files held apart (e.g. unseen speakers; at least one of several files when the fraction
    is above 0). ``max_items`` (0: all) caps the training files left after all of a validation
    folder's and that folder's files apart, or the files split by the fraction."""
    if val_files:
        held = {f.resolve() for f in val_files}
        train = [f for f in files if f.resolve() not in held]
        if not train:
            raise ValueError("every file of data.train is in data.val, leaving none to train on: name a validation "
                             "folder apart from the training files (or set --data.val= to hold none apart)")
        return (train[:max_items], val_files[:max_items]) if max_items else (train, val_files)
    files = files[:max_items] if max_items else files
    n_val = int(round(len(files) * val_fraction))
    n_val = max(1, n_val) if val_fraction > 0 and len(files) > 1 else n_val  # 0.1 of 4 files held none apart
    if n_val and n_val >= len(files):
        raise ValueError(f"data.val_fraction={val_fraction} holds all {len(files)} files of data.train apart, leaving "
                         "none to train on: lower data.val_fraction, raise data.max_items, or name a validation "
                         "folder (data.val)")
    return (files[:-n_val], files[-n_val:]) if n_val else (files, [])


def list_files(key: str, folder: str, modality: str, max_items: int, out_dir: Path) -> list[Path]:
    """The media files of a config's data folder, leaving out the run's own samples
    (``out_dir/samples``: a run inside its data folder would otherwise train on them when
    resumed) and other runs' and reports' folders inside it (:func:`outputs_under`: their
    reconstructions, and the originals of files they held apart); an error names the config key to set."""
    try:
        files = list_media(folder, modality)
    except ValueError as e:
        none = " (or --data.val= to hold none apart)" if key == "data.val" else ""
        raise ValueError(f"{key}: {e}; set --{key}=DIR{none}") from None
    skip = [(Path(out_dir) / "samples").resolve(), *outputs_under(folder)]
    kept = [f for f, real in zip(files, map(Path.resolve, files)) if not any(real.is_relative_to(s) for s in skip)]
    if not kept:
        raise ValueError(f"{key}: the only {modality} files under {folder} are training runs' samples or reports' "
                         f"pictures (in {', '.join(map(str, skip[:3]))}): set --{key}=DIR, a folder of media to train on")
    if len(kept) < len(files) and rank_and_world()[0] == 0:
        tqdm.write(f"{key}: left out {len(files) - len(kept)} files of training runs and reports under {folder}",
                   file=sys.stderr)
    return kept[:max_items] if max_items else kept


def check_stills_apart(stills: list[Path] | None, val_files: list[Path]) -> None:
    """Refuse ``data.stills`` photos that are files held apart for validation (or frames of a
    held-apart clip's folder): panned into clips, they would be trained on."""
    held = {Path(f).resolve() for f in val_files}
    over = [s for s in stills or [] if held & {s.resolve(), *s.resolve().parents}]
    if over:
        raise ValueError(f"data.stills holds {len(over)} file(s) held apart for validation "
                         f"({', '.join(p.name for p in over[:3])}): they would be trained on; name stills outside data.val")


def segment_samples(seconds: float, sample_rate: int, hop: int) -> int:
    """Samples in an audio training segment of about ``seconds``: a whole number of
    ``hop``-sample frames, refused (naming the least setting) below the longest spectral window."""
    crop = max(1, int(seconds * sample_rate) // hop) * hop
    need = max(DEFAULT_MEL_WINDOWS) // 2 + 1  # the longest spectral window, reflect-padded by half
    if crop < need:
        least = math.ceil(-(-need // hop) * hop / sample_rate * 1000) / 1000  # whole frames, in milliseconds
        least += 0.001 * (int(least * sample_rate) // hop * hop < need)  # float rounding of that
        raise ValueError(f"data.segment_seconds={seconds}: segments of {crop} samples are shorter "
                         f"than the {need} that the 2048-point spectral losses and discriminator take; "
                         f"at {sample_rate} Hz and {hop} samples a frame set at least --data.segment_seconds={least:g}")
    return crop


def check_grid(backbone, crop: int, clip_frames: int, crop_max: int = 0, batch_size: int = 1,
               needs: dict[str, int] | None = None) -> int | CropRange:
    """Refuse a pixel crop or video clip length the model cannot code, or a crop under the side
    a loss's network takes (``needs``: its name and that side), naming the key,
    before any data is read (``backbone``: an image or video backbone config); the crop
    the batches take (a :class:`CropRange` from ``crop`` to ``crop_max`` when that is set;
    a warning when its largest crop holds more pixels than ``batch_size`` crops of ``crop``)."""
    f = getattr(backbone, "downsample", None) or getattr(backbone, "spatial_downsample", None) or 1
    # the nearest multiple that keeps the setting's sense: crop rounds down, crop_max up (to stay above crop)
    for key, side, fit in (("crop", crop, max(f, crop // f * f)), ("crop_max", crop_max, -(-crop_max // f) * f)):
        if side % f:
            raise ValueError(f"data.{key}={side}: the model downsamples by {f}, so crops must be a multiple of {f}; "
                             f"use e.g. --data.{key}={fit}")
    for what, side in (needs or {}).items():
        if crop < side:
            raise ValueError(f"data.crop={crop}: {what} takes crops of at least {side} pixels a side; "
                             f"use e.g. --data.crop={-(-side // f) * f}")
    tf = getattr(backbone, "temporal_factor", None)
    if tf and (clip_frames - 1) % tf:
        fit = 1 + tf * max(1, (clip_frames - 1) // tf)
        raise ValueError(f"data.clip_frames={clip_frames}: a model with {tf}x temporal compression trains on clips "
                         f"of 1 + {tf}k frames; use e.g. --data.clip_frames={fit}")
    if crop_max <= crop:
        return crop
    if crop_max**2 > batch_size * crop**2:
        warnings.warn(f"data.crop_max={crop_max}: a {crop_max}x{crop_max} crop holds {crop_max**2 / (batch_size * crop**2):.2g}x "
                      f"the pixels of a step of {batch_size} crops of {crop}x{crop} (it is trained one at a time), so memory "
                      f"peaks there: raise batch_size or lower data.crop_max if it runs out", stacklevel=2)
    return CropRange(crop, crop_max, max(f, -(-(crop_max - crop) // (4 * f)) * f))  # at most 5 sides


def warn_undersized(data: MediaFolder, size: int, frames: int, key: str) -> None:
    """Warn when most training items are smaller than a crop (``size``: samples, or pixels
    a side) or, for video, shorter than a clip: their batches would be mostly padding."""
    items = data.items
    if not items:
        return
    small = sum(min(x.shape[-2:]) < size if data.media.has_pixels else x.shape[-1] < size for x in items)
    short = sum(x.shape[1] < frames for x in items) if data.media.clips else 0
    for n, what, setting in ((small, "smaller than the crop", key), (short, "shorter than a clip", "data.clip_frames")):
        if 2 * n > len(items):
            warnings.warn(f"{n} of {len(items)} training items are {what} ({setting}), so batches are mostly "
                          f"padding (zeros, edge pixels or a repeated last frame): lower {setting}", stacklevel=2)
