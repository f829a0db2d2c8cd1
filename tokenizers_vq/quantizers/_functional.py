"""Pure helpers shared by the quantizers, and the torch reference nearest-code search.

Every nearest-codeword search in the library goes through :func:`nearest_codes`.
On CPU (and wherever Triton is not available) it runs the chunked torch reference
below; on CUDA it dispatches to the Triton kernel in ``tokenizers_vq.kernels``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Literal["l2", "cosine"]
Backend = Literal["auto", "torch", "triton"]

# Largest distance block the reference materialises: 2**24 fp32 elements = 64 MiB.
DEFAULT_BLOCK_ELEMS = 2**24


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


def code_histogram(codes: Tensor, size: int) -> Tensor:
    """Counts of each code in ``codes`` as fp32 ``(size,)``, without a one-hot and
    without a host sync (``bincount``'s output length depends on the data)."""
    flat = codes.reshape(-1)
    counts = torch.zeros(size, device=codes.device, dtype=torch.float32)
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def code_statistics(x: Tensor, idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per-code assignment counts ``(K,)`` and sums of assigned rows ``(K, d)``, fp32.

    Args:
        x: ``(N, d)`` latents.
        idx: ``(N,)`` int64 code of each row.

    Segment sums by ``index_add_`` (no one-hot, no host sync); on CUDA the Triton
    version in ``tokenizers_vq.kernels`` is used when available.
    """
    if x.is_cuda:
        op = _triton_op("code_statistics_triton")
        if op is not None:
            return op(x, idx, size)
    sums = torch.zeros(size, x.shape[1], device=x.device, dtype=torch.float32)
    sums.index_add_(0, idx, x.float())
    return code_histogram(idx, size), sums


def perplexity(counts: Tensor, eps: float = 1e-10) -> Tensor:
    """exp(entropy) of the distribution given by ``counts`` ``(K,)``."""
    p = counts / counts.sum().clamp_min(eps)
    return torch.exp(-(p * torch.log(p.clamp_min(eps))).sum())


def _prepare(x: Tensor, codebook: Tensor, metric: Metric) -> tuple[Tensor, Tensor]:
    x, codebook = x.float(), codebook.float()
    if metric == "cosine":
        x, codebook = l2norm(x), l2norm(codebook)
    elif metric != "l2":
        raise ValueError(f"unknown metric {metric!r}; expected 'l2' or 'cosine'")
    return x, codebook


@torch.no_grad()
def nearest_codes_reference(
    x: Tensor, codebook: Tensor, metric: Metric = "l2", block_elems: int = DEFAULT_BLOCK_ELEMS
) -> tuple[Tensor, Tensor]:
    """Chunked torch reference of the nearest-code search.

    Distances are computed in fp32 as ``|x|^2 - 2 x.c + |c|^2`` (``l2``) or
    ``1 - x.c`` on unit vectors (``cosine``), over blocks of at most
    ``block_elems`` distances (64 MiB of fp32 by default) so that temporaries stay
    bounded whatever N and K are. Ties go to the lowest index.

    Args:
        x: ``(N, d)`` queries.
        codebook: ``(K, d)`` codewords.

    Returns:
        ``(dist, idx)``: ``(N,)`` fp32 distances (squared Euclidean for ``l2``,
        ``1 - cos`` for ``cosine``) and ``(N,)`` int64 indices.
    """
    x, codebook = _prepare(x, codebook, metric)
    n, k = x.shape[0], codebook.shape[0]
    c_sq = codebook.pow(2).sum(-1)
    best_d = torch.empty(n, device=x.device, dtype=torch.float32)
    best_i = torch.empty(n, device=x.device, dtype=torch.int64)
    k_blk = max(1, min(k, block_elems))
    n_blk = max(1, block_elems // k_blk)
    for n0 in range(0, n, n_blk):
        xb = x[n0 : n0 + n_blk]
        run_d = torch.full((xb.shape[0],), math.inf, device=x.device)
        run_i = torch.zeros(xb.shape[0], device=x.device, dtype=torch.int64)
        for k0 in range(0, k, k_blk):
            cb = codebook[k0 : k0 + k_blk]
            if metric == "l2":
                d = torch.addmm(c_sq[k0 : k0 + k_blk].unsqueeze(0), xb, cb.t(), alpha=-2.0)
            else:
                d = 1.0 - xb @ cb.t()
            bd, bi = d.min(dim=1)  # first minimum on ties
            better = bd < run_d  # strict: earlier blocks win ties
            run_d = torch.where(better, bd, run_d)
            run_i = torch.where(better, bi + k0, run_i)
        if metric == "l2":
            run_d = (run_d + xb.pow(2).sum(-1)).clamp_min(0)
        best_d[n0 : n0 + n_blk] = run_d
        best_i[n0 : n0 + n_blk] = run_i
    return best_d, best_i


def _triton_op(name: str = "nearest_codes_triton"):
    """A Triton op from ``tokenizers_vq.kernels.nearest``, or None when Triton or the
    kernel is not importable (imported lazily: ``import tokenizers_vq`` never loads triton)."""
    try:
        from tokenizers_vq.kernels import nearest as _nearest  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(_nearest, name, None)


def nearest_codes(
    x: Tensor, codebook: Tensor, metric: Metric = "l2", backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    """Nearest codeword of each row of ``x``; the single entry point for search.

    Args:
        x: ``(N, d)`` queries (any float dtype; computed in fp32).
        codebook: ``(K, d)`` codewords.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (``1 - cos``).
        backend: ``"auto"`` uses the Triton kernel for CUDA tensors when it is
            available and the torch reference otherwise; ``"torch"`` or
            ``"triton"`` force one.

    Returns:
        ``(dist, idx)``, both ``(N,)``: fp32 distances and int64 indices.
    """
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_codes expects x (N, d) and codebook (K, d); got {tuple(x.shape)} and {tuple(codebook.shape)}"
        )
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    if backend != "torch" and (backend == "triton" or x.is_cuda):
        op = _triton_op()
        if op is not None:
            return op(x, codebook, metric=metric)
        if backend == "triton":
            raise RuntimeError("backend='triton' requested but the Triton kernel is not available (pip install triton)")
    return nearest_codes_reference(x, codebook, metric)
