"""Weight-free reconstruction and token metrics.

Images: PSNR (here), SSIM and MS-SSIM from ``pytorch-msssim`` (Gaussian window
11, sigma 1.5, as in Wang et al. 2004 / 2003). Audio: multi-scale mel distance,
multi-resolution STFT distance and SI-SDR (``tokenizers_vq.spectral``); PESQ
(``pesq``, wide-band, 16 kHz) and STOI (``pystoi``, 10 kHz internally) when those
packages are installed. Tokens: usage, perplexity, entropy, bitrate. Feature sets: the
Fréchet distance of their Gaussian fits (FID's formula; the features come from
``eval.inception``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from tokenizers_vq.errors import MissingDependency
from tokenizers_vq.quantizers._functional import code_histogram
from tokenizers_vq.spectral import (
    DEFAULT_MEL_WINDOWS,
    STFT_RESOLUTIONS,
    multires_stft_distance,
    multiscale_mel_distance,
    si_sdr,
)


PSNR_CAP_DB = 100.0
"""The PSNR of equal (or closer) inputs: a finite value, so that means over items and the
JSON of a report stay numbers when one item is coded exactly (a flat colour, a black frame)."""


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB between two tensors of the same shape, at most :data:`PSNR_CAP_DB`."""
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = torch.mean((x.double() - y.double()) ** 2).item()
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(data_range**2 / mse))


def colour_shift(x: Tensor, y: Tensor) -> float:
    """A colour cast of the reconstruction ``x`` against ``y``, in 8-bit levels (0-255):
    the largest per-channel mean of ``x - y`` in absolute value, for pictures in [0, 1]
    with channels on axis -3, averaged over pictures (``(T, C, H, W)`` frames: each frame's
    own, so opposite casts in two frames do not cancel). PSNR counts a cast but cannot tell it
    from lost detail (a model can learn a colour for the one frame size it trained on)."""
    if x.ndim < 3:
        raise ValueError(f"colour_shift needs pictures (..., C, H, W), got a tensor of shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"colour_shift needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    per_channel = (x.double() - y.double()).reshape(-1, *x.shape[-3:]).mean(dim=(-2, -1))  # (pictures, C)
    return float(per_channel.abs().amax(dim=1).mean()) * 255


def _msssim():
    try:
        import pytorch_msssim  # noqa: PLC0415
    except ImportError as e:
        raise MissingDependency("SSIM and MS-SSIM need pytorch-msssim: pip install 'tokenizers_vq[eval]'") from e
    return pytorch_msssim


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> float:
    """SSIM of images ``(3, H, W)`` or ``(B, 3, H, W)`` (pytorch-msssim), with its 11-pixel
    Gaussian window; an image under 11 pixels on a side gets the largest odd window that
    fits (pytorch-msssim would leave out the smoothing along that side)."""
    _ssim = _msssim().ssim

    x, y = (t.unsqueeze(0) if t.ndim == 3 else t for t in (x, y))
    side = min(x.shape[-2:])
    win = 11 if side >= 11 else max(1, side - (1 - side % 2))
    return float(_ssim(x.float(), y.float(), data_range=data_range, size_average=True, win_size=win))


def ms_ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> float | None:
    """MS-SSIM (5 scales) of images at least 161 pixels on the short side, else None."""
    _ms_ssim = _msssim().ms_ssim

    x, y = (t.unsqueeze(0) if t.ndim == 3 else t for t in (x, y))
    if min(x.shape[-2:]) <= 160:
        return None
    return float(_ms_ssim(x.float(), y.float(), data_range=data_range, size_average=True))


PESQ_WB_MIN = 0.999
"""The floor of wide-band PESQ: P.862.2's MOS-LQO mapping never goes below it (the ``pesq``
package scores noise 1.02-1.04), so a silent reconstruction of speech, which that package
cannot score, gets a score under every real one."""

SPECTRAL_MIN_SAMPLES = max(max(DEFAULT_MEL_WINDOWS), max(STFT_RESOLUTIONS)) // 2 + 1
"""The fewest samples the mel and STFT distances take: their widest window, centred, needs
half its width of signal on either side."""


def audio_metrics(estimate: Tensor, reference: Tensor, sample_rate: int) -> dict[str, float | None]:
    """Mel distance, STFT distance, SI-SDR, and PESQ-WB / STOI when available. Inputs: mono
    ``(T,)`` at ``sample_rate``.

    A metric that is undefined for the pair is ``None`` with a ``<metric>_note`` saying why,
    never a placeholder that would enter a mean: the mel and STFT distances on audio under
    :data:`SPECTRAL_MIN_SAMPLES`, STOI on audio too short for its 30-frame segments or on a
    silent reference, SI-SDR and the STFT distance against a silent reference, PESQ of a
    reference without speech or too short for it; a missing package also gives ``None``
    (without a note: the report names the package). A silent reconstruction of a signal gets
    the worst scores, not missing ones: STOI 0, PESQ :data:`PESQ_WB_MIN`, SI-SDR -80 dB."""
    from tokenizers_vq.resample import resample  # noqa: PLC0415

    n = min(estimate.shape[-1], reference.shape[-1])
    est, ref = estimate[..., :n].float().reshape(1, -1), reference[..., :n].float().reshape(1, -1)
    out: dict[str, float | None] = dict.fromkeys(("mel_distance", "stft_distance", "si_sdr_db", "pesq_wb", "stoi"))
    silent_ref = not bool(ref.abs().max() > 0) if n else True
    if n < SPECTRAL_MIN_SAMPLES:
        for key in ("mel_distance", "stft_distance"):
            out[f"{key}_note"] = f"not computed: {n} samples, the spectral windows need {SPECTRAL_MIN_SAMPLES}"
    else:
        out["mel_distance"] = float(multiscale_mel_distance(est, ref, sample_rate))
        if silent_ref:
            out["stft_distance_note"] = "not computed: the reference is silent (its spectral convergence is undefined)"
        else:
            out["stft_distance"] = float(multires_stft_distance(est, ref))
    sdr = float(si_sdr(est, ref)) if n else math.nan
    if math.isnan(sdr):
        out["si_sdr_db_note"] = "not computed: the reference is silent (or constant)"
    else:
        out["si_sdr_db"] = sdr
    try:
        from pesq import PesqError  # noqa: PLC0415
        from pesq import pesq as _pesq  # noqa: PLC0415

        e16, r16 = (resample(t, sample_rate, 16000)[0].numpy() for t in (est, ref))
        if not e16.any():  # pesq fails on an all-zero signal: the worst score, where the reference can be scored
            _pesq(16000, r16, r16, "wb")  # (raises PesqError for one without speech, or too short)
            out["pesq_wb"] = PESQ_WB_MIN
        else:
            out["pesq_wb"] = float(_pesq(16000, r16, e16, "wb"))
    except ImportError:
        pass
    except PesqError as e:  # no speech in the reference (silence, music), or too short: no score, said why
        out["pesq_wb_note"] = f"PESQ not computed: {type(e).__name__}"
    try:
        from pystoi import stoi as _stoi  # noqa: PLC0415

        if ref.shape[-1] * STOI_RATE < STOI_FRAME * sample_rate:  # less than one frame: pystoi cannot frame it
            out["stoi_note"] = "STOI not computed: shorter than one of its 25.6 ms frames"
            return out
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            score = float(_stoi(ref[0].numpy(), est[0].numpy(), sample_rate, extended=False))
        short = [w for w in caught if "Not enough STFT frames" in str(w.message)]
        if short or silent_ref:  # pystoi's placeholder (1e-5 or 0), not a score
            out["stoi_note"] = ("STOI not computed: the reference is silent" if silent_ref else
                                "STOI not computed: too short once its silent frames are removed "
                                "(it needs 30 frames of 25.6 ms of speech)")
        else:
            out["stoi"] = score
    except ImportError:
        pass
    return out


STOI_RATE, STOI_FRAME = 10000, 256
"""pystoi's sample rate and frame length in samples (25.6 ms): a clip shorter than one frame at
that rate is too short for it (pystoi itself fails on one)."""


def token_stats(codes: Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of codes seen), perplexity and entropy (bits/token) of codes
    ``(N, G)`` per codebook column, averaged over columns, and ``usage_ceiling``: the most
    usage ``N`` tokens can show, ``min(1, N / codebook_size)`` (below 1, usage says
    how many codes these tokens reached, not whether the codebook collapsed)."""
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
    return {"usage": sum(usage) / g, "usage_ceiling": min(1.0, codes.shape[0] / codebook_size),
            "perplexity": sum(ppl) / g, "entropy_bits": sum(ent) / g}


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, in float64.

    The trace of the square root is the sum of the square roots of the eigenvalues of
    ``sigma1^(1/2) sigma2 sigma1^(1/2)``, a symmetric PSD matrix with the same spectrum
    as ``sigma1 sigma2``; two symmetric eigendecompositions give it without the complex
    parts and singular-matrix failures a general ``sqrtm`` meets on rank-deficient
    covariances (fewer samples than dimensions).

    Args:
        mu1, mu2: means ``(D,)``.
        sigma1, sigma2: covariances ``(D, D)``.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(t).double().cpu() for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)


def feature_frechet_distance(a: Tensor, b: Tensor) -> float:
    """FID of two feature sets: the Fréchet distance between their Gaussian fits (mean
    and unbiased covariance, as pytorch-fid's ``np.cov``).

    With at most ``D`` samples per set the covariances are low rank and the distance
    is computed from the samples: for centred features ``A (N, D)``, ``B (M, D)``,
    ``sigma_a sigma_b = A^T (A B^T) B / ((N-1)(M-1))`` has the non-zero eigenvalues of
    ``C C^T / ((N-1)(M-1))`` with ``C = A B^T``, so ``tr((sigma_a sigma_b)^(1/2))`` is
    the sum of the singular values of ``C`` over ``sqrt((N-1)(M-1))``: an ``(N, M)``
    SVD in place of ``(D, D)`` eigendecompositions, exact, not an approximation.

    Args:
        a: ``(N, D)``, b: ``(M, D)``; ``N, M >= 2``.
    """
    a, b = a.double().cpu(), b.double().cpu()
    (n, d), m = a.shape, b.shape[0]
    if min(n, m) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 samples per set, got {n} and {m}")
    ca, cb = a - a.mean(0), b - b.mean(0)
    if max(n, m) > d:
        return frechet_distance(a.mean(0), ca.T @ ca / (n - 1), b.mean(0), cb.T @ cb / (m - 1))
    trace_sqrt = torch.linalg.svdvals(ca @ cb.T).sum() / math.sqrt((n - 1) * (m - 1))
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    return float(mean_term + ca.square().sum() / (n - 1) + cb.square().sum() / (m - 1) - 2 * trace_sqrt)
