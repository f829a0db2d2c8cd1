"""Weight-free reconstruction and token metrics.

Images: PSNR (here), SSIM and MS-SSIM from ``pytorch-msssim`` (Gaussian window
11, sigma 1.5, as in Wang et al. 2004 / 2003). Audio: multi-scale mel distance,
multi-resolution STFT distance and SI-SDR (``tokenizers_vq.spectral``); PESQ
(``pesq``, wide-band, 16 kHz) and STOI (``pystoi``, 10 kHz internally) when those
packages are installed. Tokens: usage, perplexity, entropy, bitrate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenizers_vq.quantizers._functional import code_histogram
from tokenizers_vq.spectral import multires_stft_distance, multiscale_mel_distance, si_sdr


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB between two tensors of the same shape (``inf`` when equal)."""
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = torch.mean((x.double() - y.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> float:
    """SSIM of images ``(3, H, W)`` or ``(B, 3, H, W)`` (pytorch-msssim)."""
    from pytorch_msssim import ssim as _ssim  # noqa: PLC0415

    x, y = (t.unsqueeze(0) if t.ndim == 3 else t for t in (x, y))
    return float(_ssim(x.float(), y.float(), data_range=data_range, size_average=True))


def ms_ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> float | None:
    """MS-SSIM (5 scales) of images at least 161 pixels on the short side, else None."""
    from pytorch_msssim import ms_ssim as _ms_ssim  # noqa: PLC0415

    x, y = (t.unsqueeze(0) if t.ndim == 3 else t for t in (x, y))
    if min(x.shape[-2:]) <= 160:
        return None
    return float(_ms_ssim(x.float(), y.float(), data_range=data_range, size_average=True))


def audio_metrics(estimate: Tensor, reference: Tensor, sample_rate: int) -> dict[str, float | None]:
    """Mel distance, STFT distance, SI-SDR, and PESQ-WB / STOI when available
    (``None`` when their package is missing). Inputs: mono ``(T,)`` at ``sample_rate``."""
    from tokenizers_vq.media import resample  # noqa: PLC0415

    n = min(estimate.shape[-1], reference.shape[-1])
    est, ref = estimate[..., :n].float().reshape(1, -1), reference[..., :n].float().reshape(1, -1)
    out: dict[str, float | None] = {
        "mel_distance": float(multiscale_mel_distance(est, ref, sample_rate)),
        "stft_distance": float(multires_stft_distance(est, ref)),
        "si_sdr_db": float(si_sdr(est, ref)),
        "pesq_wb": None,
        "stoi": None,
    }
    try:
        from pesq import pesq as _pesq  # noqa: PLC0415

        e16, r16 = (resample(t, sample_rate, 16000)[0].numpy() for t in (est, ref))
        out["pesq_wb"] = float(_pesq(16000, r16, e16, "wb"))
    except ImportError:
        pass
    try:
        from pystoi import stoi as _stoi  # noqa: PLC0415

        out["stoi"] = float(_stoi(ref[0].numpy(), est[0].numpy(), sample_rate, extended=False))
    except ImportError:
        pass
    return out


def token_stats(codes: Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of codes seen), perplexity and entropy (bits/token) of codes
    ``(N, G)`` per codebook column, averaged over columns."""
    codes = codes.reshape(codes.shape[0], -1)
    usage, ppl, ent = [], [], []
    for col in codes.t():
        counts = code_histogram(col.long(), codebook_size)
        p = counts / counts.sum()
        h = -(p[p > 0] * p[p > 0].log2()).sum().item()
        usage.append((counts > 0).float().mean().item())
        ent.append(h)
        ppl.append(2**h)
    g = len(usage)
    return {"usage": sum(usage) / g, "perplexity": sum(ppl) / g, "entropy_bits": sum(ent) / g}
