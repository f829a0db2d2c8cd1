"""Band-limited resampling of audio: a windowed-sinc filter written here (torchaudio >= 2.9
needs torchcodec for files and may not import on CPU builds)."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor


def resample(wav: Tensor, orig_sr: int, new_sr: int, taps: int = 16, rolloff: float = 0.95) -> Tensor:
    """Band-limited resampling of ``(..., T)`` from ``orig_sr`` to ``new_sr`` Hz.

    With ``o/n`` the reduced ratio, output sample ``m`` sits at input position
    ``m*o/n``; it is ``sum_k x[k] h(m*o/n - k)`` with ``h`` a Hann-windowed sinc
    of cut-off ``rolloff * min(1, n/o)`` (in input-sample units) and
    ``taps / cutoff`` input samples on each side. Phases ``m mod n`` share a base
    index, so this is one strided ``conv1d`` with ``n`` output channels, whose kernel
    has ``n * (2 * taps / cutoff + o)`` entries; when that is large (coprime rates
    such as 11127 -> 16000 Hz would need over 10^8), the same sum is taken per
    output sample over its ``2 * taps / cutoff + 1`` neighbours instead.

    Returns:
        ``(..., ceil(T * new_sr / orig_sr))``.
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} and {new_sr}")
    if orig_sr == new_sr:
        return wav
    if not wav.is_floating_point():  # the filter's taps, all under 1, would round to 0
        raise ValueError(f"resample takes float audio, got {wav.dtype}: convert it first "
                         "(e.g. wav.float() / 32768 for 16-bit PCM)")
    ratio = Fraction(new_sr, orig_sr)
    n, o = ratio.numerator, ratio.denominator
    cutoff = rolloff * min(1.0, n / o)
    width = math.ceil(taps / cutoff)
    lead, length = wav.shape[:-1], wav.shape[-1]
    out_len = math.ceil(length * n / o)
    if wav.numel() == 0:
        return wav.new_zeros(*lead, out_len)
    x = wav.reshape(-1, length)
    if n * (2 * width + o) > 2**20:
        return _resample_by_neighbours(x, n, o, cutoff, width, out_len).reshape(*lead, -1)
    k = torch.arange(-width, width + o, dtype=torch.float64, device=wav.device)  # taps around each base index
    kernel = _windowed_sinc(torch.arange(n, dtype=torch.float64, device=wav.device).unsqueeze(1) * o / n - k, cutoff, width)
    x = F.pad(x.unsqueeze(1), (width, width + o))
    out = F.conv1d(x, kernel.to(wav.dtype).unsqueeze(1), stride=o)  # (B, n, frames)
    out = out.transpose(1, 2).reshape(x.shape[0], -1)
    return out[:, :out_len].reshape(*lead, -1)


def _windowed_sinc(t: Tensor, cutoff: float, width: int) -> Tensor:
    """``h(t)``: the sinc of cut-off ``cutoff`` times a Hann window of half-width ``width``."""
    window = torch.where(t.abs() <= width, torch.cos(t * math.pi / (2 * width)) ** 2, 0.0)
    return cutoff * torch.sinc(cutoff * t) * window


def _resample_by_neighbours(x: Tensor, n: int, o: int, cutoff: float, width: int, out_len: int) -> Tensor:
    """:func:`resample` of ``(B, T)`` as a sum per output sample: output ``m`` sums the
    inputs ``k = floor(m*o/n) + j``, ``|j| <= width``, weighted by ``h(m*o/n - k)``;
    in blocks of outputs whose gathered inputs hold about 2^22 numbers."""
    j = torch.arange(-width, width + 1, device=x.device)
    padded = F.pad(x, (width, width + 1))
    block = max(1, 2**22 // (x.shape[0] * j.numel()))
    outs = []
    for start in range(0, out_len, block):
        m = torch.arange(start, min(out_len, start + block), dtype=torch.int64, device=x.device)
        base, frac = m * o // n, (m * o % n).double() / n
        h = _windowed_sinc(frac.unsqueeze(1) - j, cutoff, width).to(x.dtype)  # (M, taps)
        outs.append((padded[:, base.unsqueeze(1) + j + width] * h).sum(-1))
    return torch.cat(outs, -1) if outs else x.new_zeros(x.shape[0], 0)
