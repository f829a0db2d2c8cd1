"""Pure helpers shared by the quantizers, and the one entry point of the nearest-code search.

Every nearest-codeword search in the library goes through :func:`nearest_codes`.
On CPU (and wherever Triton is not available) it runs the chunked torch reference
(:mod:`tokenizers_vq.quantizers._reference`), whose answer depends on the values only
(not on the CPU, threads or blocking); on CUDA it dispatches to the Triton kernel in
``tokenizers_vq.kernels``.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenizers_vq.kernels._host import plain_eager
from tokenizers_vq.quantizers._reference import Metric, _reference_op, nearest_codes_reference

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = get_args(Backend)
Estimator = Literal["ste", "rotation", "nsvq", "diveq"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
METRICS: tuple[str, ...] = get_args(Metric)


def l2norm(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Normalise the last axis to unit length (zero vectors stay zero)."""
    return F.normalize(x, dim=-1, eps=eps)


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Return ``q`` in the forward pass and pass gradients to ``x`` unchanged.

    Written as ``q + (x - x.detach())`` rather than ``x + (q - x).detach()``: the
    added term is exactly zero for finite ``x``, so the forward value equals ``q``
    bit for bit and ``decode(encode(z))`` matches ``forward(z).quantized``.
    """
    return q.detach() + (x - x.detach())


def rotation_trick(x: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Rotation-trick gradient estimator (Fifty et al., 2024, "Restructuring
    Vector Quantization with the Rotation Trick").

    Forward value is ``q``. Backward treats ``q = s * R x`` with the rotation ``R``
    (taking ``x/|x|`` to ``q/|q|``) and the scale ``s = |q| / |x|`` held constant,
    so the gradient reaching ``x`` is rotated and rescaled instead of copied.

    Args:
        x: encoder outputs, ``(..., d)``.
        q: chosen codewords, ``(..., d)``.
    """
    xd, qd = x.detach(), q.detach()
    x_norm = xd.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = qd.norm(dim=-1, keepdim=True)
    u = xd / x_norm
    v = qd / q_norm.clamp_min(eps)
    r = l2norm(u + v, eps)
    # R x = x - 2 (x.r) r + 2 (x.u) v ; with R, u, v, r constant.
    rotated = x - 2 * (x * r).sum(-1, keepdim=True) * r + 2 * (x * u).sum(-1, keepdim=True) * v
    rotated = rotated * (q_norm / x_norm)
    return straight_through(rotated, q)


def noise_substitution(x: Tensor, q: Tensor, variance: float | None = None, eps: float = 1e-12) -> Tensor:
    """``x`` moved by its quantization error's length ``|q - x|`` along a unit direction ``u`` held
    constant: a training-time output (its value is not ``q``). With the upstream gradient ``g``,
    ``q`` gets ``(g . u) e`` and ``x`` gets ``g - (g . u) e``, ``e`` the error's unit direction
    ``(q - x) / |q - x|`` (a codebook learned by gradient learns from the first).

    With ``variance=None``, ``u = v / |v|``, ``v ~ N(0, I)`` (NSVQ: Vali and Baeckstroem 2022,
    "NSVQ: Noise Substitution in Vector Quantization for Machine Learning"); with a variance,
    ``u`` is the error's own direction with Gaussian noise of that variance added before
    normalising (DiVeQ: Vali and Baeckstroem 2025, "DiVeQ: Differentiable Vector Quantization
    Using the Reparameterization Trick"), so the value stays near ``q`` where the error is long
    next to the noise (``sqrt(variance * d)``).

    Args:
        x: encoder outputs, ``(..., d)``.
        q: chosen codewords, ``(..., d)``.
    """
    err = q - x
    noise = torch.randn_like(x)
    direction = l2norm(noise if variance is None else err.detach() + math.sqrt(variance) * noise, eps)
    return x + err.norm(dim=-1, keepdim=True) * direction.detach()


DIVEQ_VARIANCE = 5e-3
"""Variance of the noise added to the error's direction by the ``"diveq"`` estimator: the default
of vector-quantize-pytorch's ``directional_reparam``. It is absolute: on unit-norm latents
(``metric="cosine"``), whose errors are often shorter than its ``sqrt(variance * d)``, the direction
is mostly noise and DiVeQ comes close to NSVQ."""
NOISE_ESTIMATORS = ("nsvq", "diveq")


def estimate(estimator: Estimator, x: Tensor, q: Tensor, training: bool) -> Tensor:
    """The quantizer's output for the chosen codewords ``q`` of ``x``: ``q`` in value with the
    straight-through (``"ste"``) or rotation-trick (``"rotation"``) gradient; in training (the
    module's ``training`` flag, under ``torch.no_grad()`` too), :func:`noise_substitution` for
    ``"nsvq"`` (a random direction) and ``"diveq"`` (the error's direction with noise of variance
    :data:`DIVEQ_VARIANCE`), and ``q`` with the straight-through gradient outside training."""
    if estimator in NOISE_ESTIMATORS and training:
        return noise_substitution(x, q, DIVEQ_VARIANCE if estimator == "diveq" else None)
    return rotation_trick(x, q) if estimator == "rotation" else straight_through(x, q)


def check_codeword_outputs(quantizers, where: str) -> None:
    """Refuse quantizers (or quantizers inside them) with a noise-substitution estimator where
    ``where`` builds on their training output as if it were their codewords (the next level's
    residual, the next scale, the bottom level's input): in training it is not."""
    for quantizer in quantizers:
        for m in quantizer.modules():
            if getattr(m, "estimator", None) in NOISE_ESTIMATORS:
                raise ValueError(f"{where} builds on each level's codewords, but a level has estimator="
                                 f"{m.estimator!r}, whose training output is x moved by a noisy error, not its "
                                 "codewords: give its levels estimator='ste' or 'rotation'")


def code_histogram(codes: Tensor, size: int) -> Tensor:
    """Counts of each code in ``codes`` (any integer dtype) as fp32 ``(size,)``, without a one-hot
    and without a host sync (``bincount``'s output length depends on the data); codes outside
    ``[0, size)`` are not counted, as in the CUDA version of :func:`code_statistics`."""
    if size < 0:
        raise ValueError(f"the number of codes must be >= 0, got {size}")
    flat = codes.reshape(-1).long()
    ok = ((flat >= 0) & (flat < size)).long()
    counts = torch.zeros(size, device=codes.device, dtype=torch.long)  # integer sums: exact past 2^24 rows a code
    return (counts.index_add_(0, flat.clamp(0, max(size - 1, 0)), ok) if size else counts).float()


def code_statistics(x: Tensor, idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per-code assignment counts ``(K,)`` and sums of assigned rows ``(K, d)``, fp32.

    Args:
        x: ``(N, d)`` latents.
        idx: ``(N,)`` code of each row, of any integer dtype; codes outside ``[0, size)``
            are left out of both.
        size: ``K``, a whole number >= 0.

    Segment sums by ``index_add_`` (no one-hot, no host sync); on CUDA the Triton
    version in ``tokenizers_vq.kernels`` is used when available.
    """
    if x.ndim != 2 or idx.shape != x.shape[:1]:
        raise ValueError(f"expected x (N, d) and idx (N,); got {tuple(x.shape)} and {tuple(idx.shape)}")
    if x.device != idx.device:
        raise ValueError(f"x on {x.device} but idx on {idx.device}: move both to one device")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"idx must hold integer code ids, got dtype {idx.dtype}: pass the codes as an integer tensor "
                         "(e.g. idx.round().long() for ids stored as floats)")
    if not isinstance(size, (numbers.Integral, torch.SymInt)) or isinstance(size, bool):
        raise ValueError(f"the number of codes must be a whole number, got {size!r}: pass size as an int")
    size = int(size)
    if size < 0:
        raise ValueError(f"the number of codes must be >= 0, got {size}")
    if x.is_cuda:
        op = _triton_op("code_statistics_triton")
        if op is not None:
            return op(x, idx, size)
    flat = idx.long()
    ok = ((flat >= 0) & (flat < size)).unsqueeze(1)
    sums = torch.zeros(size, x.shape[1], device=x.device, dtype=torch.float32)
    if size:
        sums.index_add_(0, flat.clamp(0, size - 1), torch.where(ok, x.float(), 0.0))
    return code_histogram(flat, size), sums


def perplexity(counts: Tensor, eps: float = 1e-10) -> Tensor:
    """exp(entropy) of the distribution given by ``counts`` ``(K,)``."""
    p = counts / counts.sum().clamp_min(eps)
    return torch.exp(-(p * torch.log(p.clamp_min(eps))).sum())



def _triton_op(name: str = "nearest_codes_triton"):
    """A Triton op from ``tokenizers_vq.kernels.nearest``, or None when Triton or the
    kernel is not importable (imported lazily: ``import tokenizers_vq`` never loads triton)."""
    try:
        from tokenizers_vq.kernels import nearest as _nearest  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(_nearest, name, None)


def _interpreted() -> bool:
    """Whether Triton kernels run on the CPU here (``TRITON_INTERPRET=1``)."""
    from tokenizers_vq.kernels.relaunch import interpreting  # noqa: PLC0415

    return interpreting()


def nearest_codes(
    x: Tensor, codebook: Tensor, metric: Metric = "l2", backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    """Nearest codeword of each row of ``x``; the single entry point for search.

    Args:
        x: ``(N, d)`` queries (any real float dtype; computed in fp32).
        codebook: ``(K, d)`` codewords (real).
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (``1 - cos``).
        backend: ``"auto"`` uses the Triton kernel for CUDA tensors when it is
            available and the torch reference otherwise; ``"torch"`` or
            ``"triton"`` force one.

    Returns:
        ``(dist, idx)``, both ``(N,)``: fp32 distances and int64 indices. Ties go to the
        lowest index: on the torch path among codewords of equal exact distance, the same
        on every CPU (see :func:`nearest_codes_reference`); in the Triton kernel among
        equal computed distances.
    """
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_codes expects x (N, d) and codebook (K, d); got {tuple(x.shape)} and {tuple(codebook.shape)}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    if x.is_complex() or codebook.is_complex():
        raise ValueError(f"nearest_codes searches real vectors, got {x.dtype} queries and a {codebook.dtype} codebook: "
                         "pass torch.view_as_real(t).flatten(-2) of both (real and imaginary parts as channels)")
    if x.device != codebook.device:
        raise ValueError(f"x on {x.device} but codebook on {codebook.device}: move both to one device")
    if backend != "torch" and (backend == "triton" or x.is_cuda):
        op = _triton_op()
        if op is not None:
            if not x.is_cuda and not _interpreted():
                raise ValueError(f"backend='triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); "
                                 f"x is on {x.device}: use backend='auto' or 'torch'")
            return op(x.detach(), codebook.detach(), metric=metric)  # no gradient, as on the torch path
        if backend == "triton":
            raise RuntimeError("backend='triton' requested but the Triton kernel is not available (pip install triton)")
    if plain_eager(x, codebook):
        return nearest_codes_reference(x.detach(), codebook.detach(), metric)
    return _reference_op(x.detach(), codebook.detach(), metric)
