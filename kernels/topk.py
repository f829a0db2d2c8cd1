"""Fused k-nearest-codeword search, ``k <= 8`` (Triton).

Same scores as :mod:`tokenizers_vq.kernels.nearest` (``s = b_k - a_k x.c_k``). Each
row keeps an unordered set of its ``k`` best ``(score, index)`` pairs in registers.
Per codebook tile, ``k`` rounds take the tile's row minimum (lowest column on ties),
knock it out of the tile, and let it replace the set's worst member when strictly
better. Tiles arrive in index order and a round's pick has a higher index than any
equal-scored pair already held, so strict ``<`` keeps ties at the lowest indices.
A last pass emits the set in ascending ``(score, index)`` order.

Splits over the codebook (small ``N``) write ``S`` sorted partial lists; a stable sort
of their concatenation (in split order) merges them with the same tie rule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenizers_vq.kernels.tiles import (
    _block_d,
    _finish,
    _load_rows,
    launch,
    new_outputs,
    prune_to_fit,
    _row_offset,
    _score_tile,
    _split_plan,
    cdiv,
    codeword_terms,
    next_pow2,
)

_BIG = tl.constexpr(2**31 - 1)


def _configs() -> list[triton.Config]:
    """Smaller tiles than top-1: the ``k`` rounds keep the score tile and the sets live."""
    shapes = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (32, 128, 4, 3)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in shapes]


@triton.jit
def _scan(x, X_row, rmask, C, BIAS, SCALE, g, K, D, sxd, scg, sck, scd, k_lo, k_hi, dd, cols, slots,
          COSINE: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
          ROBUST: tl.constexpr):
    """Each row's ``TOPK`` best ``(score, index)`` pairs over codes ``[k_lo, k_hi)``, unordered
    in ``KP`` slots. Unused slots (>= TOPK) hold -inf so they are never the worst; empty ones
    +inf with distinct negative indices. NaN scores rank as +inf. ``ROBUST`` (run only where
    empty slots are left): a taken column is never taken again, and an empty slot is the
    worst among equal scores, so a code of score +inf (a NaN row, an overflow) still fills it."""
    r_val = tl.where(slots[None, :] < TOPK, float("inf"), -float("inf")) + tl.zeros([BLOCK_N, KP], tl.float32)
    r_idx = (-1 - slots)[None, :] + tl.zeros([BLOCK_N, KP], tl.int32)
    for t in range(0, tl.cdiv(k_hi - k_lo, BLOCK_K)):
        kk = k_lo + t * BLOCK_K + cols
        kmask = kk < k_hi
        C_tile = C + g * scg + kk[None, :].to(tl.int64) * sck
        s = _score_tile(x, X_row, rmask, C_tile, kk, kmask, dd, D, sxd, scd, BIAS + g * K, SCALE + g * K,
                        COSINE, ONE_CHUNK, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D, DOT_F32)
        s = tl.where(s == s, s, float("inf"))  # a NaN (a NaN row or code) would make a tile's minimum NaN
        if ROBUST:
            col_of = tl.where(kmask[None, :], cols[None, :], BLOCK_K) + tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        for _ in tl.static_range(TOPK):
            m = tl.min(s, axis=1)
            if ROBUST:
                col = tl.min(tl.where(s == m[:, None], col_of, BLOCK_K), axis=1)
                hit = col_of == col[:, None]
                s = tl.where(hit, float("inf"), s)
                col_of = tl.where(hit, BLOCK_K, col_of)
                w = tl.max(r_val, axis=1)
                key = tl.where(r_idx < 0, _BIG + r_idx, r_idx)
                w_key = tl.max(tl.where(r_val == w[:, None], key, -_BIG), axis=1)
                better = ((m < w) | ((m == w) & (w_key >= _BIG - KP))) & (col < BLOCK_K)
                put = (r_val == w[:, None]) & (key == w_key[:, None]) & better[:, None]
            else:
                col = tl.min(tl.where(s == m[:, None], cols[None, :], BLOCK_K), axis=1)
                s = tl.where(cols[None, :] == col[:, None], float("inf"), s)
                w = tl.max(r_val, axis=1)
                w_idx = tl.max(tl.where(r_val == w[:, None], r_idx, -_BIG), axis=1)
                put = (r_val == w[:, None]) & (r_idx == w_idx[:, None]) & (m < w)[:, None]
            r_val = tl.where(put, m[:, None], r_val)
            r_idx = tl.where(put, (k_lo + t * BLOCK_K + col)[:, None], r_idx)
    return r_val, r_idx


@triton.autotune(configs=_configs(), key=["BLOCK_D", "PRECISION", "TOPK"],  # and the dtypes
                 prune_configs_by={"early_config_prune": prune_to_fit}, cache_results=True)
@triton.jit
def _topk_kernel(X, C, BIAS, SCALE, OUT_S, OUT_I, OFF, N, K, D, K_SPLIT,
                 sxg, sxn, sxd, scg, sck, scd, sog, sos,
                 COSINE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, WRITE_DIST: tl.constexpr,
                 ONE_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid ``(row blocks, splits, G)``. Writes ``(G, N, TOPK)`` distances and int64
    indices, or with ``SPLIT`` partial scores / int32 indices ``(G, S, N, TOPK)`` and
    the row offsets ``(G, N)``."""
    pid_n, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    dd = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, KP)
    X_row = X + g * sxg + rows[:, None].to(tl.int64) * sxn
    x, x_sq = _load_rows(X_row, rmask, dd, D, sxd, ONE_CHUNK, BLOCK_N, BLOCK_D)

    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    r_val, r_idx = _scan(x, X_row, rmask, C, BIAS, SCALE, g, K, D, sxd, scg, sck, scd, k_lo, k_hi, dd, cols, slots,
                         COSINE, ONE_CHUNK, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D, DOT_F32, TOPK, KP, False)
    if tl.min(tl.where(slots[None, :] < TOPK, r_idx, 0)) < 0:  # a row with fewer than TOPK finite scores here
        r_val, r_idx = _scan(x, X_row, rmask, C, BIAS, SCALE, g, K, D, sxd, scg, sck, scd, k_lo, k_hi, dd, cols, slots,
                             COSINE, ONE_CHUNK, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D, DOT_F32, TOPK, KP, True)

    off = _row_offset(x_sq, COSINE)
    finite = (x_sq < float("inf"))[:, None]  # a row of Inf or NaN: its split's first codes, as on the torch path
    first = k_lo + slots[None, :]
    r_val = tl.where(finite, r_val, float("inf"))
    r_idx = tl.where(finite, r_idx, tl.where(first < k_hi, first, _BIG))
    r_val = tl.where(slots[None, :] < TOPK, r_val, float("inf"))
    r_idx = tl.where(slots[None, :] < TOPK, r_idx, _BIG)
    for j in tl.static_range(TOPK):  # emit in ascending (score, index) order
        m = tl.min(r_val, axis=1)
        i = tl.min(tl.where(r_val == m[:, None], r_idx, _BIG), axis=1)
        taken = (r_val == m[:, None]) & (r_idx == i[:, None])
        r_val = tl.where(taken, float("inf"), r_val)
        r_idx = tl.where(taken, _BIG, r_idx)
        if SPLIT:
            o = g * sog + pid_s * sos + rows * TOPK + j
            tl.store(OUT_S + o, m, mask=rmask)
            tl.store(OUT_I + o, i, mask=rmask)
        else:
            o = g * sog + rows * TOPK + j
            if WRITE_DIST:
                tl.store(OUT_S + o, _finish(m, off, COSINE), mask=rmask)
            tl.store(OUT_I + o, i.to(tl.int64), mask=rmask)
    if SPLIT:
        if pid_s == 0:
            tl.store(OFF + g * N + rows, off, mask=rmask)


def nearest_topk(x: Tensor, codebook: Tensor, k: int, cosine: bool, precision: str, write_dist: bool,
                 split_k: int | None) -> tuple[Tensor, Tensor]:
    """Launch on grouped ``x (G, N, d)`` / ``codebook (G, K, d)`` (same float dtype),
    ``1 <= k <= min(8, K)``; returns ``(G, N, k)`` fp32 distances (empty unless
    ``write_dist``) and int64 indices, ascending."""
    g, n, d = x.shape
    kc = codebook.shape[1]
    dist, idx = new_outputs(x, write_dist, k)
    if n == 0:
        return dist, idx
    bias, scale = codeword_terms(codebook, cosine)
    block_d, one_chunk = _block_d(d, x.element_size())
    prec = precision if x.dtype == torch.float32 else "tf32"
    s, k_split = _split_plan(g, n, kc, x.device, split_k)
    meta = dict(COSINE=cosine, PRECISION=prec, SPLIT=s > 1, WRITE_DIST=write_dist, ONE_CHUNK=one_chunk,
                BLOCK_D=block_d, DOT_F32=triton.knobs.runtime.interpret and x.dtype == torch.bfloat16, TOPK=k,
                KP=max(2, next_pow2(k)))

    def grid(m):
        return (cdiv(n, m["BLOCK_N"]), s, g)

    if s == 1:
        launch(_topk_kernel, grid, g * n * kc, x, codebook, bias, scale, dist, idx, dist, n, kc, d, k_split,
                           *x.stride(), *codebook.stride(), n * k, 0, **meta)
        return dist, idx
    part_s = torch.empty(g, s, n, k, device=x.device, dtype=torch.float32)
    part_i = torch.empty(g, s, n, k, device=x.device, dtype=torch.int32)
    off = torch.empty(g, n, device=x.device, dtype=torch.float32)
    launch(_topk_kernel, grid, g * n * kc, x, codebook, bias, scale, part_s, part_i, off, n, kc, d, k_split,
                       *x.stride(), *codebook.stride(), s * n * k, n * k, **meta)
    # (G, N, S*k) in split order, each split ascending: a stable sort keeps lower indices first on ties;
    # a split of fewer than k codes leaves empty slots (negative indices), put last as NaN scores
    cat_i = part_i.permute(0, 2, 1, 3).reshape(g, n, s * k)
    cat_s = part_s.permute(0, 2, 1, 3).reshape(g, n, s * k).masked_fill(cat_i < 0, float("nan"))
    top_s, pos = torch.sort(cat_s, dim=-1, stable=True)
    top_s, pos = top_s[..., :k], pos[..., :k]
    idx.copy_(cat_i.gather(-1, pos))
    if write_dist:
        o = off.unsqueeze(-1)
        dist.copy_(1.0 + top_s * o if cosine else (o + 2.0 * top_s).clamp_min(0.0))
    return dist, idx
