"""Spectral features and distances for audio, in torch only (no torchaudio).

Used by the audio training losses and by the evaluation metrics, so both compute
the same thing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor


def hz_to_mel(f: Tensor) -> Tensor:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@functools.lru_cache(maxsize=32)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """Triangular HTK mel filters ``(n_mels, n_fft // 2 + 1)`` (unit peak)."""
    with torch.inference_mode(False):  # cached: usable later with autograd too
        return _mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)


def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float | None) -> Tensor:
    f_max = f_max or sample_rate / 2
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(hz_to_mel(torch.tensor(f_min)), hz_to_mel(torch.tensor(f_max)), n_mels + 2, dtype=torch.float64))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lo) / (mid - lo).clamp_min(1e-9)
    down = (hi - freqs) / (hi - mid).clamp_min(1e-9)
    return torch.clamp(torch.minimum(up, down), min=0).float()


@functools.lru_cache(maxsize=64)
def _filterbank_on(sample_rate: int, n_fft: int, n_mels: int, device: torch.device) -> Tensor:
    """:func:`mel_filterbank` copied to ``device`` once (a copy per call would make every
    mel loss on the GPU wait for a host-to-device transfer)."""
    with torch.inference_mode(False):  # cached: usable later with autograd too
        return mel_filterbank(sample_rate, n_fft, n_mels).to(device)


def stft_magnitude(wav: Tensor, n_fft: int, hop: int) -> Tensor:
    """``(B, T)`` or ``(B, 1, T)`` -> ``(B, n_fft // 2 + 1, frames)`` magnitudes (Hann window)."""
    if wav.shape[-1] <= n_fft // 2:  # the centred frames' reflected padding needs more
        raise ValueError(f"{wav.shape[-1]} samples are too few for an FFT of {n_fft} (more than {n_fft // 2} needed): "
                         "compare longer audio, or pad it")
    wav = wav.reshape(-1, wav.shape[-1]).float()
    window = torch.hann_window(n_fft, device=wav.device)
    spec = torch.stft(wav, n_fft, hop, window=window, return_complex=True, center=True, pad_mode="reflect")
    return spec.abs()


def mel_spectrogram(wav: Tensor, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> Tensor:
    """``(B, n_mels, frames)`` mel magnitudes."""
    fb = _filterbank_on(sample_rate, n_fft, n_mels, wav.device)
    return fb @ stft_magnitude(wav, n_fft, hop)


DEFAULT_MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)


def multiscale_mel_distance(
    x: Tensor, y: Tensor, sample_rate: int, windows: Sequence[int] = DEFAULT_MEL_WINDOWS, eps: float = 1e-5
) -> Tensor:
    """Mean over window sizes ``w`` (hop ``w/4``, ``n_mels`` = 5, 10, 20, 40, 80, 160,
    320: DAC's windows and mel counts) of ``|log10(mel(x)+eps) - log10(mel(y)+eps)|``, averaged; a
    scalar, 0 for identical inputs. Not DAC's value (HTK mel filters, ``+eps`` instead of
    its clamp, a mean over the windows instead of a sum: about 1/4 to 1/5 of it on coded speech)."""
    total = x.new_zeros((), dtype=torch.float32)
    for w in windows:
        n_mels = max(5, int(5 * w / 32))
        n_mels = min(n_mels, w // 2)
        mx = mel_spectrogram(x, sample_rate, w, w // 4, n_mels)
        my = mel_spectrogram(y, sample_rate, w, w // 4, n_mels)
        total = total + (torch.log10(mx + eps) - torch.log10(my + eps)).abs().mean()
    return total / len(windows)


STFT_RESOLUTIONS = (512, 1024, 2048)
"""The FFT sizes of :func:`multires_stft_distance`."""


def multires_stft_distance(
    x: Tensor, y: Tensor, resolutions: Sequence[int] = STFT_RESOLUTIONS, eps: float = 1e-5
) -> Tensor:
    """Multi-resolution STFT loss (Yamamoto et al. 2020): spectral convergence
    ``|Y - X|_F / |Y|_F`` plus mean ``|log Y - log X|``, averaged over FFT sizes
    (hop = size/4). The convergence term leaves out items whose target ``y`` is silent (a
    root-mean-square magnitude under ``eps``): divided by their near-zero norm, a silent batch
    would give 5e5 where speech gives about 1; the log term still compares them."""
    total = x.new_zeros((), dtype=torch.float32)
    for n in resolutions:
        mx, my = stft_magnitude(x, n, n // 4), stft_magnitude(y, n, n // 4)
        heard = (my.reshape(my.shape[0], -1).square().mean(1) > eps**2).reshape(-1, 1, 1)  # per item
        sc = torch.linalg.vector_norm((my - mx) * heard) / torch.linalg.vector_norm(my * heard).clamp_min(eps)
        total = total + sc + (torch.log(my + eps) - torch.log(mx + eps)).abs().mean()
    return total / len(resolutions)


def spectrogram_db(wav: Tensor, sample_rate: int, n_fft: int = 1024) -> Tensor:
    """``(n_mels=80, frames)`` log-mel in dB of a mono ``(T,)`` signal, for pictures (a signal
    shorter than ``n_fft`` is shown followed by silence)."""
    wav = wav.reshape(1, -1)
    wav = torch.nn.functional.pad(wav, (0, max(0, n_fft - wav.shape[-1])))
    mel = mel_spectrogram(wav, sample_rate, n_fft, n_fft // 4, 80)[0]
    return 20 * torch.log10(mel.clamp_min(1e-5))


def si_sdr(estimate: Tensor, reference: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant SDR in dB of ``(..., T)`` signals (Le Roux et al. 2019), within
    ``[10 log10(eps), -10 log10(eps)]`` (+-80 dB): the floor is relative to the estimate's
    energy, so a quiet estimate scores as the same estimate louder. A silent (or constant)
    estimate of a signal gets the floor, the worst score; NaN where the zero-mean reference
    is silent, for which the ratio is undefined."""
    reference = reference - reference.mean(-1, keepdim=True)
    estimate = estimate - estimate.mean(-1, keepdim=True)
    ref_energy = reference.pow(2).sum(-1, keepdim=True)
    alpha = (estimate * reference).sum(-1, keepdim=True) / ref_energy
    target = alpha * reference
    noise = estimate - target
    floor = eps * estimate.pow(2).sum(-1)
    ratio = 10 * torch.log10(target.pow(2).sum(-1).clamp_min(floor) / noise.pow(2).sum(-1).clamp_min(floor))
    ratio = ratio.where(floor > 0, 10 * math.log10(eps))
    return ratio.where(ref_energy.squeeze(-1) > 0, torch.nan)


__all__ = [
    "STFT_RESOLUTIONS",
    "mel_filterbank",
    "mel_spectrogram",
    "multires_stft_distance",
    "multiscale_mel_distance",
    "si_sdr",
    "spectrogram_db",
    "stft_magnitude",
]
