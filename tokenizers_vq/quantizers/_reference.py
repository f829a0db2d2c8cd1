"""The torch reference of the nearest-code search (CPU, and CUDA without Triton): its answer depends
on the values only, not on the CPU, the thread count, the BLAS code path or the blocking.
:func:`tokenizers_vq.quantizers._functional.nearest_codes` is the entry point that picks it."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenizers_vq.kernels._host import check_fp32_range

Metric = Literal["l2", "cosine"]

# Largest distance block the reference materialises: 2**24 fp32 elements = 64 MiB; on a CPU 2**21 (8 MiB),
# which its caches keep between a block's passes (3x faster at 667 x 65536). The answer does not depend on it.
DEFAULT_BLOCK_ELEMS = 2**24
CPU_BLOCK_ELEMS = 2**21


def _prepare(x: Tensor, codebook: Tensor, metric: Metric) -> tuple[Tensor, Tensor]:
    x, codebook = x.float(), codebook.float()
    if metric == "cosine":
        x, codebook = F.normalize(x, dim=-1, eps=1e-12), F.normalize(codebook, dim=-1, eps=1e-12)
    elif metric != "l2":
        raise ValueError(f"unknown metric {metric!r}; expected 'l2' or 'cosine'")
    return x, codebook


def fixed_order_sum(t: Tensor) -> Tensor:
    """Sum over the last axis ``(..., d) -> (...)`` by a fixed pairwise tree of elementwise additions.

    Every output element is the same sequence of correctly rounded IEEE additions, whatever its
    position, the tensor's size and strides, the thread count or the CPU's vector width, so equal
    rows give equal sums bit for bit on every CPU (a reduction kernel may split and reorder the
    sum by any of those).
    """
    if t.shape[-1] == 0:
        return t.new_zeros(t.shape[:-1])
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        head = t[..., :half] + t[..., half : 2 * half]
        if t.shape[-1] % 2:
            head[..., :1] += t[..., 2 * half :]
        t = head
    return t[..., 0]


# Elements per operation of the exact pass: small enough to stay in cache and on one thread (ATen splits
# elementwise work over threads from 2**15 elements; a busy core then stalls every such operation).
EXACT_CHUNK_ELEMS = 2**15


def _exact_distances(x: Tensor, codebook: Tensor, rows: Tensor, cols: Tensor, metric: Metric) -> Tensor:
    """fp64 distances ``(M,)`` of the pairs ``(x[rows], codebook[cols])``, each computed from its
    two rows alone by elementwise operations and :func:`fixed_order_sum` (``x``, ``codebook``
    unnormalised fp32; ``cosine`` divides by the norms clamped at ``1e-12``, as :func:`l2norm`)."""
    out = torch.empty(rows.shape[0], device=x.device, dtype=torch.float64)
    step = max(1, EXACT_CHUNK_ELEMS // max(x.shape[1], 1))
    for p0 in range(0, rows.shape[0], step):
        xs = x.index_select(0, rows[p0 : p0 + step]).double()
        cs = codebook.index_select(0, cols[p0 : p0 + step]).double()
        if metric == "l2":
            diff = xs.sub_(cs)
            out[p0 : p0 + step] = fixed_order_sum(diff.mul_(diff))
        else:
            x_norm = fixed_order_sum(xs * xs).sqrt_().clamp_min_(1e-12)
            c_norm = fixed_order_sum(cs * cs).sqrt_().clamp_min_(1e-12)
            out[p0 : p0 + step] = 1.0 - fixed_order_sum(xs.mul_(cs)) / (x_norm * c_norm)
    return out


def _operand_rounding() -> float:
    """Relative rounding of fp32 matmul operands on CPU: 0 (exact fp32 products) unless
    ``torch.set_float32_matmul_precision`` or oneDNN's ``fp32_precision`` lets matmuls run
    in bf16 or tf32; then bf16's ``2^-8``, the coarser of the two."""
    onednn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    lowered = torch.get_float32_matmul_precision() != "highest"
    lowered = lowered or getattr(onednn, "fp32_precision", "none") not in ("none", "ieee")
    return 2.0**-8 if lowered else 0.0


def _row_min(s: Tensor, width: int = 128) -> tuple[Tensor, Tensor]:
    """``s.min(dim=1)`` (first index of the least; NaN rows NaN) on a CPU via each run of ``width``
    columns' least (vectorised; the index-returning reduction is 17x slower), then the first run."""
    n, k = s.shape
    if s.device.type != "cpu" or k % width or k < 4 * width:
        return s.min(dim=1)
    low, run = (runs := s.view(n, k // width, width)).amin(2).min(dim=1)
    return low, runs[torch.arange(n, device=s.device), run].argmin(1) + run * width


def _merge_pairs(run_e: Tensor, run_i: Tensor, rows: Tensor, cols: Tensor, e: Tensor) -> None:
    """Fold candidate pairs ``(rows, cols)`` with exact distances ``e`` into the running best
    per row, in place: the lowest distance, then the lowest index; NaN never beats a number."""
    e = e.masked_fill(e.isnan(), math.inf)
    e_min = torch.full_like(run_e, math.inf).scatter_reduce_(0, rows, e, "amin")
    at_min = e == e_min[rows]
    i_min = torch.full_like(run_i, torch.iinfo(torch.int64).max)
    i_min.scatter_reduce_(0, rows[at_min], cols[at_min], "amin")
    better = (e_min < run_e) | ((e_min == run_e) & (i_min < run_i))
    run_e.copy_(torch.where(better, e_min, run_e))
    run_i.copy_(torch.where(better, i_min, run_i))


@torch.no_grad()
def nearest_codes_reference(
    x: Tensor, codebook: Tensor, metric: Metric = "l2", block_elems: int | None = None
) -> tuple[Tensor, Tensor]:
    """Chunked torch reference of the nearest-code search, whose answer depends on the values only.

    Blocks of at most ``block_elems`` query-codeword pairs (64 MiB of fp32 by default, 8 MiB on
    a CPU) keep temporaries bounded whatever N and K are (``N x K`` is never built), in two passes:

    1. Screening: fp32 matmul scores ``|c|^2 - 2 x.c`` (``l2``) or ``-x.c`` on unit vectors
       (``cosine``: its distance ``1 - x.c`` less a constant). The BLAS rounds them differently for different block shapes, offsets,
       thread counts and CPUs, so they only pick candidates: per row, the codewords scoring
       within ``tol = 4 eps`` of the lowest score so far. ``eps = (2 u_in + (d + 4) 2^-24) m``
       bounds the rounding error of one score, with ``m = (|x| + max|c|)^2`` (``l2``) or 4
       (``cosine``) and ``u_in = 2^-8`` where torch may run fp32 matmuls in bf16 or tf32,
       else 0. Two scores err by at most ``2 eps`` together; the other factor 2 covers the
       rounding of ``tol`` itself and of the exact pass.
    2. Exact pass: a candidate's distance is recomputed in fp64 from its two rows alone
       (``sum (x_j - c_j)^2``, or ``1 - x.c / (|x| |c|)``) by elementwise operations and a
       fixed summation tree (:func:`fixed_order_sum`), so it is the same bit for bit wherever
       the codeword sits, and on every CPU. A row whose only candidate is its lowest score
       needs no comparison.

    A codeword outside the candidates scores more than ``tol`` above the best, so its exact
    distance is strictly larger than the best candidate's: the result is the lowest index
    among the codewords of least exact distance. Ties (equal codewords, wherever they sit) so
    go to the lowest index on every CPU, for every ``block_elems``, thread count and BLAS code
    path. NaN distances never win; a row with no comparable codeword (NaN in ``x``) gets index
    0, and an empty codebook gives ``inf`` and index 0. A row whose fp32 scores overflow (values
    beyond about 1e19) screens nothing out, so its exact pass (fp64) compares every codeword.
    A few codewords far longer than the rest (``l2``, :data:`FAR_FACTOR`) are compared with
    every row exactly and the rest searched as above, with the same answer: their length in
    ``max|c|`` would otherwise send most pairs to the exact pass.

    Args:
        x: ``(N, d)`` queries.
        codebook: ``(K, d)`` codewords.
        metric: ``"l2"`` or ``"cosine"``.
        block_elems: query-codeword pairs per screening block (None: the device's default).

    Returns:
        ``(dist, idx)``: ``(N,)`` fp32 distances (squared Euclidean for ``l2``, ``1 - cos``
        for ``cosine``: the exact-pass value, rounded once) and ``(N,)`` int64 indices.
    """
    check_fp32_range(x, codebook)
    if block_elems is None:
        block_elems = CPU_BLOCK_ELEMS if x.device.type == "cpu" else DEFAULT_BLOCK_ELEMS
    far = _far_codes(codebook) if metric == "l2" else None
    if far is not None:
        return _with_far_codes(x, codebook, far, block_elems)
    raw_x, raw_c = x.float(), codebook.float()
    x, codebook = _prepare(x, codebook, metric)
    n, k, d = x.shape[0], codebook.shape[0], x.shape[1]
    if k == 0:
        return torch.full((n,), math.inf, device=x.device), torch.zeros(n, device=x.device, dtype=torch.int64)
    unit = 2 * _operand_rounding() + (d + 4) * 2.0**-24
    if metric == "l2":
        c_sq = codebook.pow(2).sum(-1)
        c_norm = codebook.norm(dim=-1)
        c_max = c_norm.masked_fill(~c_norm.isfinite(), 0).amax()
    best_i = torch.empty(n, device=x.device, dtype=torch.int64)
    k_blk = max(1, min(k, block_elems))
    n_blk = max(1, block_elems // k_blk)
    one_block = k_blk >= k  # then a row's only candidate is its answer, unchecked
    pair_blk = max(64, block_elems // 16)  # pairs merged at once: 24 bytes each, 3/8 of a block's bytes
    tile = max(pair_blk, block_elems // 4)  # candidates listed at once: int64 pairs of one block's bytes
    tile_rows, tile_cols = max(1, tile // k_blk), min(k_blk, tile)

    def merge(run_e, run_i, rows, cols, n0):
        for p0 in range(0, rows.numel(), pair_blk):
            r, c = rows[p0 : p0 + pair_blk], cols[p0 : p0 + pair_blk]
            _merge_pairs(run_e, run_i, r, c, _exact_distances(raw_x, raw_c, r + n0, c, metric))

    for n0 in range(0, n, n_blk):
        xb = x[n0 : n0 + n_blk]
        nb = xb.shape[0]
        tol = 4 * unit * ((xb.norm(dim=-1) + c_max) ** 2 if metric == "l2" else xb.new_full((nb,), 4.0))
        tol = tol + 4 * (x.shape[1] + 4) * 2.0**-149  # fp32 subnormals: an absolute rounding, not a relative one
        screen = torch.full((nb,), math.inf, device=x.device)
        run_e = torch.full((nb,), math.inf, device=x.device, dtype=torch.float64)
        run_i = torch.full((nb,), k, device=x.device, dtype=torch.int64)  # k: none yet
        for k0 in range(0, k, k_blk):
            cb = codebook[k0 : k0 + k_blk]
            if metric == "l2":
                s = torch.addmm(c_sq[k0 : k0 + k_blk].unsqueeze(0), xb, cb.t(), alpha=-2.0)
            else:  # 1 - x.c less its constant 1 (beta=0: no pass to broadcast an input first)
                s = torch.addmm(xb.new_zeros(()), xb, cb.t(), beta=0.0, alpha=-1.0)
            low, arg = _row_min(s)
            if low.isnan().any():
                s.masked_fill_(s.isnan(), math.inf)
                low, arg = _row_min(s)
            screen = torch.minimum(screen, low)
            # a row whose scores or tolerance overflow fp32 (|x| or |c| beyond ~1e19) screens
            # nothing out: every code goes to the exact pass, which holds such values in fp64
            thr = (screen + tol).nan_to_num(nan=math.inf, posinf=math.inf)
            s.scatter_(1, arg.unsqueeze(1), math.inf)
            arg += k0
            crowded = s.amin(dim=1) <= thr  # another codeword of this block within tol
            alone = (low <= thr) & ~crowded
            if one_block:
                run_i = torch.where(alone, arg, run_i)
            else:
                rows = alone.nonzero(as_tuple=True)[0]
                merge(run_e, run_i, rows, arg[rows], n0)
            crowd = crowded.nonzero(as_tuple=True)[0]
            for r0 in range(0, crowd.numel(), tile_rows):
                ra = crowd[r0 : r0 + tile_rows]
                merge(run_e, run_i, ra, arg[ra], n0)
                for c0 in range(0, k_blk, tile_cols):
                    rr, cc = (s[ra, c0 : c0 + tile_cols] <= thr[ra].unsqueeze(1)).nonzero(as_tuple=True)
                    merge(run_e, run_i, ra[rr], cc + (k0 + c0), n0)
            del s
        best_i[n0 : n0 + n_blk] = run_i.masked_fill_(run_i == k, 0)
    best_d = torch.empty(n, device=x.device, dtype=torch.float32)
    for p0 in range(0, n, pair_blk):
        rows = torch.arange(p0, min(n, p0 + pair_blk), device=x.device)
        best_d[p0 : p0 + pair_blk] = _exact_distances(raw_x, raw_c, rows, best_i[p0 : p0 + pair_blk], metric)
    return best_d, best_i


FAR_FACTOR = 16.0
"""A codeword longer than this many times the median length is searched apart (``l2``)."""


def _far_codes(codebook: Tensor) -> Tensor | None:
    """Indices of a few codewords far longer than the rest (a diverged or stray code), which
    would widen every row's screening tolerance to most of the codebook; None when there
    are none, or too many to search apart."""
    if codebook.shape[0] < 2:
        return None
    norms = codebook.float().norm(dim=-1)
    finite = norms.isfinite()
    far = finite & (norms > FAR_FACTOR * norms[finite].median().clamp_min(1e-30)) if finite.any() else finite
    count = int(far.sum())
    return far.nonzero().squeeze(1) if 0 < count <= max(8, codebook.shape[0] // 64) else None


def _with_far_codes(x: Tensor, codebook: Tensor, far: Tensor, block_elems: int) -> tuple[Tensor, Tensor]:
    """:func:`nearest_codes_reference` (``l2``) with the codewords ``far`` compared to every row
    exactly, the rest searched as usual: the same answer (least exact distance, lowest index
    on ties) without the tolerance that their length would give every row."""
    near = torch.ones(codebook.shape[0], dtype=torch.bool, device=codebook.device)
    near[far] = False
    near_idx = near.nonzero().squeeze(1)
    best = near_idx[nearest_codes_reference(x, codebook[near_idx], "l2", block_elems)[1]]
    raw_x, raw_c = x.float(), codebook.float()
    rows = torch.arange(x.shape[0], device=x.device)
    best_e = _exact_distances(raw_x, raw_c, rows, best, "l2")
    for j in far.tolist():
        e = _exact_distances(raw_x, raw_c, rows, torch.full_like(rows, j), "l2")
        better = (e < best_e) | ((e == best_e) & (best > j))
        best, best_e = torch.where(better, j, best), torch.where(better, e, best_e)
    lost = best_e.isnan()  # a row with no comparable codeword (NaN in x): index 0, as everywhere
    best = best.masked_fill(lost, 0)
    best_e = torch.where(lost, _exact_distances(raw_x, raw_c, rows, best, "l2"), best_e)
    return best_e.float(), best


# One opaque op to torch.compile (as the Triton search is): its candidate lists have data-dependent sizes.
@torch.library.custom_op("tokenizers_vq::nearest_codes_reference", mutates_args=())
def _reference_op(x: Tensor, codebook: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    return nearest_codes_reference(x, codebook, metric)


@_reference_op.register_fake
def _(x, codebook, metric):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.int64)
