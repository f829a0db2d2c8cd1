"""Inference over time in chunks of frames, for the causal video backbone: layers that keep
the frame rate run a few frames at a time, each causal conv carrying its last input frames
from one chunk to the next (:mod:`~tokenizers_vq.backbones.carry`), so a large clip's frames come out as
in one pass with a fraction of the memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from tokenizers_vq.backbones import carry

_progress: ContextVar[Callable[[int, int], None] | None] = ContextVar("time_chunk_progress", default=None)


@contextmanager
def frames_progress(desc: str) -> Iterator[None]:
    """Inside the block, a clip whose full-resolution layers :func:`run_over_time` runs in
    chunks shows a progress bar of its frames (``desc``): such a clip takes a minute or two on
    a 2-core CPU at 720p. Clips run in one pass show none."""
    from tqdm import tqdm  # noqa: PLC0415

    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc=desc, unit="frame", leave=False)
        bar.update(done - bar.n)

    token = _progress.set(report)
    try:
        yield
    finally:
        _progress.reset(token)
        if bar is not None:
            bar.close()


def time_major(x: Tensor) -> bool:
    """Whether ``x (B, C, T, H, W)`` is held channels-last (``channels_last_3d``) and not
    also in PyTorch's default layout (one channel)."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


CHUNK_PIXELS = {"cpu": 1 << 21, "cuda": 1 << 22}
"""Frames times pixels per frame that the full-resolution layers of an inference pass hold
at once, by device type (others as the CPU): larger clips run those layers over time in
chunks of frames (:func:`run_over_time`), which gives the same frames with a fraction of the
memory. Measured with the embedded video model on 17-frame clips, against one pass: 720p on
a 2-core CPU, 4.2 GB to encode instead of 12.7 and 5.5 GB to decode instead of 16.9, at
about the same speed; 1080p on an H100, 10.1 GB instead of 32.2 for 28% fewer frames per
second encoded (two frames per chunk there: one took as much memory and was slower). Chosen
by shape and device type alone, so every machine of a kind computes the same way."""


def frames_per_chunk(batch: int, frames: int, pixels: int, device: torch.device) -> int | None:
    """Frames per chunk for the time-stride-1 layers of an inference pass over ``batch``
    clips of ``frames`` frames of ``pixels`` pixels at full resolution, or None to run them
    over the whole clip (training, compiling, or clips that fit :data:`CHUNK_PIXELS`)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    budget = CHUNK_PIXELS.get(device.type, CHUNK_PIXELS["cpu"])
    chunk = max(1, budget // max(1, batch * pixels))
    return chunk if chunk < frames else None


def run_over_time(stages: list, x: Tensor, chunk: int | None) -> Tensor:
    """``stages`` (modules whose causal convs all have time stride 1; the first may double
    time, ``doubles_time``) applied to ``x`` ``(B, C, T, H, W)``, over the whole clip or in
    chunks of ``chunk`` input frames: each causal conv (``carries_time``) carries its
    last input frames from one chunk to the next, and norms are per frame, so every output
    frame sees what it sees in one piece."""
    if chunk is None or any(carry.compiled(m) for s in stages for m in s.modules()):  # (compiled: no carry)
        for stage in stages:
            x = stage(x)
        return x
    convs = [m for s in stages for m in s.modules() if getattr(m, "carries_time", False)]
    out = None
    with carry.running(convs):  # this thread's: another thread's encode of the same model is apart
        done = 0
        for t0 in range(0, x.shape[2], chunk):
            h = x[:, :, t0 : t0 + chunk]
            for stage in stages:
                h = stage(h)
            if out is None:
                doubles = any(getattr(s, "doubles_time", False) for s in stages)
                frames = 2 * x.shape[2] - 1 if doubles else x.shape[2]
                layout = torch.channels_last_3d if time_major(h) else torch.contiguous_format
                out = torch.empty((*h.shape[:2], frames, *h.shape[3:]), dtype=h.dtype, device=h.device,
                                  memory_format=layout)
            out[:, :, done : done + h.shape[2]] = h
            done += h.shape[2]
            if (report := _progress.get()) is not None:
                report(done, out.shape[2])  # frames out (twice the frames in, less one, where a stage doubles time)
    return out
