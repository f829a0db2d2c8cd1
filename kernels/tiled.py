"""The tiled nearest-codeword kernel (Triton), the general top-1 search.

For each query row ``x_n`` the kernel returns the codeword minimising

* ``l2``:     ``|x_n - c_k|^2 = |x_n|^2 + 2 (|c_k|^2 / 2 - x_n.c_k)``
* ``cosine``: ``1 - x_n.c_k / (|x_n| |c_k|)``, and since ``|x_n|`` is fixed per row,
  the argmin is that of ``-x_n.c_k / |c_k|``.

So one per-codeword bias ``b_k`` (``|c_k|^2 / 2``, or ``0``) and scale ``a_k``
(``1``, or ``1 / |c_k|``), both precomputed in fp32 ``(G, K)``, turn each
tensor-core dot product into the score ``s_nk = b_k - a_k x_n.c_k`` with one CUDA-core
operation. The kernel walks the codebook in ``BLOCK_K`` tiles and keeps, per element
of the ``(BLOCK_N, BLOCK_K)`` tile, the running minimum and the tile number it came
from (compare + 2 selects): about 4 operations per distance, nothing ``N x K`` ever
reaches memory, and ties keep the earliest tile (the lowest index). One reduction
over the tile columns at the end picks the row's minimum, lowest index first.

From ``d >= SearchPlan.row_reduce_min_d`` (512), where the dot dwarfs the epilogue, each tile is
reduced to its rows' ``(min, lowest index)`` at once instead (``ROW_REDUCE``): one running
pair per row leaves the registers to larger tiles and deeper pipelines (H100: 3.6 against
4.6 ms at 32768 x 16384 x 1536, ``eval/results/kernels/sweep_h100.md`` section 7).

When there are too few row blocks to fill the GPU the codebook is split over
``S`` programs per row block; a second tiny pass merges the ``S`` partial results
in index order. Top-k (``k <= 8``) lives in :mod:`tokenizers_vq.kernels.topk`, EMA
statistics in :mod:`tokenizers_vq.kernels.segment`, and the packed-key top-1
variant (the default where it applies: the distance in the dot, 1.5 to 2 integer
operations per distance) in :mod:`tokenizers_vq.kernels.packed`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenizers_vq.kernels import relaunch
from tokenizers_vq.kernels.plan import DEFAULT_PLAN, SearchPlan
from tokenizers_vq.kernels.tiles import (
    _block_d,
    _finish,
    _interpret,
    _load_rows,
    _row_offset,
    _score_tile,
    _split_plan,
    aligned,
    cdiv,
    codeword_terms,
    launch,
    merge_rows,
    new_outputs,
    prune_to_fit,
)

def _configs() -> list[triton.Config]:
    """Candidate tiles ``(BLOCK_N, BLOCK_K, warps, stages)``. Small ``d`` is bound by the
    per-distance epilogue (wide tiles, 3 live fp32 values per distance in registers);
    large ``d`` by the dot (GEMM-like tiles, deeper pipelines). ``_prune`` picks the set."""
    shapes = [(128, 128, 8, 3), (64, 256, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3),  # small d
              (128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3),  # large d
              (128, 128, 8, 5),  # best at d = 1536 in the H100 sweep (eval/results/kernels/sweep_h100.md)
              # ROW_REDUCE (d >= ROW_REDUCE_MIN_D): one running value per row, not per tile element, leaves
              # the registers to larger tiles (more flops per byte of operands read from L2) and deeper pipelines
              (128, 256, 8, 4), (256, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 6),
              (128, 128, 8, 5), (128, 128, 8, 3), (128, 64, 4, 4)]  # the last two: fp32 rows fit
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in shapes]


ROW_REDUCE_CONFIGS = 9  # _configs()[9:] are the ROW_REDUCE set


def _prune(configs, named_args, **meta):
    """The set for this ``BLOCK_D`` (small or large ``d``; ``ROW_REDUCE``), pruned to fit."""
    if meta.get("ROW_REDUCE"):  # 224 KiB leaves about 3 KiB of the H100's 232448 bytes for the row reductions'
        # scratch (all compiled and ran there); the autotuner skips a config that runs out of shared memory anyway
        return prune_to_fit(configs[ROW_REDUCE_CONFIGS:], named_args, limit=224 * 1024, x_staged=True, **meta)
    return prune_to_fit(configs[:4] if meta["BLOCK_D"] <= 32 else configs[4:ROW_REDUCE_CONFIGS], named_args, **meta)


# Keyed on D and SPLIT too: with only BLOCK_D (64 for every large d), the tile tuned at d = 256 ran at
# d = 1536 as well, 16% slower there than the best (eval/results/kernels/sweep_h100.md).
@triton.autotune(configs=_configs(), key=["BLOCK_D", "PRECISION", "D", "SPLIT", "ROW_REDUCE"],  # and the dtypes
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit
def _nearest_kernel(X, C, BIAS, SCALE, OUT_S, OUT_I, OFF, N, K, D, K_SPLIT,
                    sxg, sxn, sxd, scg, sck, scd, sog, sos,
                    COSINE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, WRITE_DIST: tl.constexpr,
                    ONE_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_REDUCE: tl.constexpr = False):
    """Grid ``(row blocks, splits, G)``. Writes ``(dist, idx)`` ``(G, N)``, or with
    ``SPLIT`` the partial ``(score, idx)`` ``(G, S, N)`` and the row offsets ``(G, N)``.
    ``ROW_REDUCE`` (large ``d``, where the dot dwarfs the epilogue): each tile is reduced
    to its rows' ``(min, lowest index)`` at once, one running pair per row."""
    pid_n, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    dd = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_K)
    X_row = X + g * sxg + rows[:, None].to(tl.int64) * sxn
    x, x_sq = _load_rows(X_row, rmask, dd, D, sxd, ONE_CHUNK, BLOCK_N, BLOCK_D)

    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    if ROW_REDUCE:
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_i = tl.full([BLOCK_N], 0, tl.int32) + k_lo
    else:
        best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        best_t = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for t in range(0, tl.cdiv(k_hi - k_lo, BLOCK_K)):
        kk = k_lo + t * BLOCK_K + cols
        kmask = kk < k_hi
        C_tile = C + g * scg + kk[None, :].to(tl.int64) * sck
        s = _score_tile(x, X_row, rmask, C_tile, kk, kmask, dd, D, sxd, scd, BIAS + g * K, SCALE + g * K,
                        COSINE, ONE_CHUNK, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D, DOT_F32)
        if ROW_REDUCE:
            m_t = tl.min(s, axis=1)
            i_t = tl.min(tl.where((s == m_t[:, None]) & kmask[None, :], kk[None, :], K), axis=1)
            lt = m_t < best  # strict: an earlier tile (lower index) keeps a tie
            best = tl.where(lt, m_t, best)
            best_i = tl.where(lt, i_t, best_i)
        else:
            lt = s < best  # strict: an earlier tile (lower index) keeps a tie
            best = tl.where(lt, s, best)
            best_t = tl.where(lt, t, best_t)

    # Row minimum, then the lowest index attaining it (rows of inf/NaN fall back to k_lo).
    if ROW_REDUCE:
        m = best
        i = best_i
    else:
        k_idx = k_lo + best_t * BLOCK_K + cols[None, :]
        m = tl.min(best, axis=1)
        cand = tl.where((best == m[:, None]) & (k_idx < k_hi), k_idx, K)
        i = tl.min(cand, axis=1)
    i = tl.where(i < k_hi, i, k_lo)
    finite = x_sq < float("inf")  # a row of Inf or NaN: no code is nearer than another, as on the torch path
    m = tl.where(finite, m, float("inf"))
    i = tl.where(finite, i, k_lo)
    off = _row_offset(x_sq, COSINE)
    if SPLIT:
        o = g * sog + pid_s * sos + rows
        tl.store(OUT_S + o, m, mask=rmask)
        tl.store(OUT_I + o, i, mask=rmask)
        if pid_s == 0:
            tl.store(OFF + g * N + rows, off, mask=rmask)
    else:
        if WRITE_DIST:
            tl.store(OUT_S + g * sog + rows, _finish(m, off, COSINE), mask=rmask)
        tl.store(OUT_I + g * sog + rows, i.to(tl.int64), mask=rmask)


@triton.jit
def _merge_kernel(PS, PI, OFF, DIST, IDX, N, S, COSINE: tl.constexpr, WRITE_DIST: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Second pass over ``S`` partials ``(G, S, N)`` in split (= index) order; strict
    ``<`` keeps the earlier split on ties."""
    g = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    best, bi = merge_rows(PS, PI, g * S * N + rows, rmask, N, S)
    if WRITE_DIST:
        off = tl.load(OFF + g * N + rows, mask=rmask, other=0.0)
        tl.store(DIST + g * N + rows, _finish(best, off, COSINE), mask=rmask)
    tl.store(IDX + g * N + rows, bi.to(tl.int64), mask=rmask)


def nearest_tiled(x: Tensor, codebook: Tensor, cosine: bool, precision: str, write_dist: bool,
                 split_k: int | None, plan: SearchPlan = DEFAULT_PLAN) -> tuple[Tensor, Tensor]:
    """Launch on grouped ``x (G, N, d)`` / ``codebook (G, K, d)``; returns ``(G, N)`` each."""
    g, n, d = x.shape
    k = codebook.shape[1]
    dist, idx = new_outputs(x, write_dist)
    if n == 0:
        return dist, idx
    bias, scale = codeword_terms(codebook, cosine)
    block_d, one_chunk = _block_d(d, x.element_size())
    prec = precision if x.dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs
    s, k_split = _split_plan(g, n, k, x.device, split_k)
    meta = dict(COSINE=cosine, PRECISION=prec, SPLIT=s > 1, WRITE_DIST=write_dist, ONE_CHUNK=one_chunk,
                BLOCK_D=block_d, DOT_F32=_interpret() and x.dtype == torch.bfloat16, ROW_REDUCE=d >= plan.row_reduce_min_d)

    def grid(m):
        return (cdiv(n, m["BLOCK_N"]), s, g)

    if s == 1:
        launch(_nearest_kernel, grid, g * n * k, x, codebook, bias, scale, dist, idx, dist, n, k, d, k_split,
                              *x.stride(), *codebook.stride(), n, 0, **meta)
        return dist, idx
    seg = aligned(g * s * n)
    part = torch.empty(2 * seg + g * n, device=x.device, dtype=torch.float32)  # one allocation
    part_s, part_i = part[:g * s * n], part[seg:seg + g * s * n].view(torch.int32)
    off = part[2 * seg:]
    launch(_nearest_kernel, grid, g * n * k, x, codebook, bias, scale, part_s, part_i, off, n, k, d, k_split,
                          *x.stride(), *codebook.stride(), s * n, n, **meta)
    relaunch.launch(_merge_kernel, (cdiv(n, 256), g), part_s, part_i, off, dist, idx, n, s, COSINE=cosine,
                    WRITE_DIST=write_dist, BLOCK=256)
    return dist, idx
