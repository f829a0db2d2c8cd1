"""Fused nearest-codeword search (Triton): kernel -> host function -> custom op.

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
4.6 ms at 32768 x 16384 x 1536, ``results/sweep_h100.md`` section 7).

When there are too few row blocks to fill the GPU the codebook is split over
``S`` programs per row block; a second tiny pass merges the ``S`` partial results
in index order. Top-k (``k <= 8``) lives in :mod:`tokenizers_vq.kernels.topk`, EMA
statistics in :mod:`tokenizers_vq.kernels.segment`, and the packed-key top-1
variant (the default where it applies: the distance in the dot, 1.5 to 2 integer
operations per distance) in :mod:`tokenizers_vq.kernels.packed`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenizers_vq.kernels._host import cdiv, next_pow2
from tokenizers_vq.kernels.plan import DEFAULT_PLAN, SearchPlan
from tokenizers_vq.kernels.segment import code_statistics_triton  # noqa: F401  (re-exported)

PRECISIONS = ("tf32", "tf32x3", "ieee")
ALGORITHMS = ("auto", "tiled", "packed")  # top-1 search: "auto" = "packed" (tokenizers_vq.kernels.packed) where it applies, else the tiled kernel
SPLIT_QUANTUM = 256  # each split covers a multiple of every BLOCK_K, so tiles never straddle splits
MAX_ONE_CHUNK_BYTES = 256  # x row bytes (padded) kept for the whole codebook walk; larger d goes in 64-wide chunks
COS_EPS = tl.constexpr(1e-12)  # as F.normalize


def _interpret() -> bool:
    return triton.knobs.runtime.interpret


TUNE_MIN_WORK = 2**26  # G*N*K below this: one fixed tile, no autotuning (compile once, launch fast)
FIXED = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
INTERPRET_FIXED = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}  # few, large CPU tiles


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


def prune_to_fit(configs, named_args, limit: int = 200 * 1024, x_staged: bool = False, **meta):
    """Keep the configs whose operand tiles fit in ``limit`` bytes of shared memory (else the
    last): the x tile once, or with ``x_staged`` (x walked in chunks) once per stage."""
    esize = named_args["X"].element_size()
    keep = [c for c in configs
            if (c.kwargs["BLOCK_N"] * (c.num_stages if x_staged else 1) + c.kwargs["BLOCK_K"] * c.num_stages)
            * meta["BLOCK_D"] * esize <= limit]
    return keep or configs[-1:]


def _prune(configs, named_args, **meta):
    """The set for this ``BLOCK_D`` (small or large ``d``; ``ROW_REDUCE``), pruned to fit."""
    if meta.get("ROW_REDUCE"):  # 224 KiB leaves about 3 KiB of the H100's 232448 bytes for the row reductions'
        # scratch (all compiled and ran there); the autotuner skips a config that runs out of shared memory anyway
        return prune_to_fit(configs[ROW_REDUCE_CONFIGS:], named_args, limit=224 * 1024, x_staged=True, **meta)
    return prune_to_fit(configs[:4] if meta["BLOCK_D"] <= 32 else configs[4:ROW_REDUCE_CONFIGS], named_args, **meta)


def launch(kernel, grid, work: int, *args, interpret_tile: dict = INTERPRET_FIXED, **meta) -> None:
    """Run a ``triton.autotune``-wrapped kernel: autotuned (per key, cached) when the
    problem is large, else its plain ``jit`` function with one fixed tile."""
    if _interpret():
        kernel.fn[grid](*args, **meta, **interpret_tile)
    elif work < TUNE_MIN_WORK:
        kernel.fn[grid](*args, **meta, **FIXED)
    else:
        kernel[grid](*args, **meta)


@triton.jit
def _row_terms_kernel(C, BIAS, SCALE, K, D, scg, sck, scd, COSINE: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-codeword ``b_k`` and ``a_k`` (see module docstring) in fp32, ``(G, K)``."""
    g = tl.program_id(1).to(tl.int64)
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = (kk[:, None] < K) & (d0 + dd[None, :] < D)
        c = tl.load(C + g * scg + kk[:, None].to(tl.int64) * sck + (d0 + dd[None, :]) * scd, mask=m, other=0.0)
        c = c.to(tl.float32)
        acc += tl.sum(c * c, axis=1)
    if COSINE:
        bias = tl.zeros([BLOCK_K], dtype=tl.float32)
        scale = 1.0 / tl.maximum(tl.sqrt(acc), COS_EPS)
    else:
        bias = 0.5 * acc
        scale = tl.full([BLOCK_K], 1.0, tl.float32)
    tl.store(BIAS + g * K + kk, bias, mask=kk < K)
    tl.store(SCALE + g * K + kk, scale, mask=kk < K)


@triton.jit
def _score_tile(x, X_row, rmask, C_tile, kk, kmask, dd, D, sxd, scd, BIAS_g, SCALE_g, COSINE: tl.constexpr,
                ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """``s = b_k - a_k x.c_k`` for one ``(BLOCK_N, BLOCK_K)`` tile; columns past the
    split get ``+inf`` through their bias. ``DOT_F32`` (interpreter only, whose bf16 dot
    is wrong) upcasts the operands first: bf16 products are exact in fp32 anyway."""
    if ONE_CHUNK:
        c = tl.load(C_tile + dd[:, None] * scd, mask=kmask[None, :] & (dd[:, None] < D), other=0.0)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), c.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(x, c, input_precision=PRECISION)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dm = d0 + dd < D
            xc = tl.load(X_row + (d0 + dd[None, :]) * sxd, mask=rmask[:, None] & dm[None, :], other=0.0)
            c = tl.load(C_tile + (d0 + dd[:, None]) * scd, mask=kmask[None, :] & dm[:, None], other=0.0)
            if DOT_F32:
                acc = tl.dot(xc.to(tl.float32), c.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xc, c, acc, input_precision=PRECISION)
    bias = tl.load(BIAS_g + kk, mask=kmask, other=float("inf"))
    if COSINE:
        scale = tl.load(SCALE_g + kk, mask=kmask, other=0.0)
        return acc * (-scale[None, :]) + bias[None, :]
    return bias[None, :] - acc


@triton.jit
def _row_offset(x_sq, COSINE: tl.constexpr):
    """What turns a score back into a distance: ``|x|^2`` (l2) or ``1 / |x|`` (cosine)."""
    if COSINE:
        return 1.0 / tl.maximum(tl.sqrt(x_sq), COS_EPS)
    return x_sq


@triton.jit
def _finish(score, off, COSINE: tl.constexpr):
    """Distance from score: ``max(|x|^2 + 2 s, 0)`` (l2) or ``1 + s / |x|`` (cosine)."""
    if COSINE:
        return 1.0 + score * off
    return tl.maximum(off + 2.0 * score, 0.0)


@triton.jit
def _load_rows(X_row, rmask, dd, D, sxd, ONE_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The x tile (kept for the whole walk when ``ONE_CHUNK``) and fp32 ``|x|^2``."""
    x = tl.load(X_row + dd[None, :] * sxd, mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    xf = x.to(tl.float32)
    x_sq = tl.sum(xf * xf, axis=1)
    if not ONE_CHUNK:
        for d0 in range(BLOCK_D, D, BLOCK_D):
            xc = tl.load(X_row + (d0 + dd[None, :]) * sxd, mask=rmask[:, None] & (d0 + dd[None, :] < D), other=0.0)
            xc = xc.to(tl.float32)
            x_sq += tl.sum(xc * xc, axis=1)
    return x, x_sq


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
def merge_rows(PS, PI, base, rmask, N, S):
    """Best ``(score, index)`` over ``S`` partials at ``base + s N``, in split (= index)
    order; strict ``<`` keeps the earlier split on ties. Scores may be fp32 or int32."""
    best = tl.load(PS + base, mask=rmask, other=0)
    bi = tl.load(PI + base, mask=rmask, other=0)
    for s in range(1, S):
        v = tl.load(PS + base + s * N, mask=rmask, other=0)
        i = tl.load(PI + base + s * N, mask=rmask, other=0)
        lt = v < best
        best = tl.where(lt, v, best)
        bi = tl.where(lt, i, bi)
    return best, bi


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


# -- host side --------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: small, so that CPU tests also take the split path


@functools.cache
def _cuda_sms(index: int) -> int:
    """SM count, cached: reading the device properties every call showed in a profile."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def aligned(numel: int) -> int:
    """``numel`` rounded up to 4 elements (16 bytes of 4-byte values): buffers carved out of
    one allocation at these offsets keep Triton's 16-byte pointer specialisation."""
    return -(-numel // 4) * 4


def _split_plan(g: int, n: int, k: int, device: torch.device, split_k: int | None,
                max_split: int | None = None, unsplit_waves: int = 2) -> tuple[int, int]:
    """``(S, K_SPLIT)``: split the codebook when the row blocks (128 rows each) cannot
    fill ``unsplit_waves`` waves of the GPU (one per SM), into enough splits for two
    waves; each split covers a multiple of ``SPLIT_QUANTUM`` codes, and at most
    ``max_split`` (a multiple of it) when given."""
    if split_k is None:
        blocks = g * cdiv(n, 128 if device.type == "cuda" else 64)
        sms = _num_sms(device)
        split_k = 1 if blocks >= unsplit_waves * sms else max(1, cdiv(2 * sms, blocks))
    k_split = cdiv(cdiv(k, max(1, split_k)), SPLIT_QUANTUM) * SPLIT_QUANTUM
    if max_split is not None:
        k_split = min(k_split, max_split)
    return cdiv(k, k_split), k_split


def _block_d(d: int, esize: int) -> tuple[int, bool]:
    """``(BLOCK_D, ONE_CHUNK)``: the whole padded row when it is small, else 64-wide chunks."""
    bd = max(16, next_pow2(d))
    if bd * esize <= MAX_ONE_CHUNK_BYTES:
        return bd, True
    return 64, False


def codeword_terms(codebook: Tensor, cosine: bool) -> tuple[Tensor, Tensor]:
    """fp32 ``(bias, scale)``, each ``(G, K)``, of a ``(G, K, d)`` codebook (no fp32 copy)."""
    g, k, d = codebook.shape
    seg = aligned(g * k)
    both = torch.empty(2 * seg, device=codebook.device, dtype=torch.float32)  # one allocation
    bias, scale = both[:g * k].view(g, k), both[seg:seg + g * k].view(g, k)
    bd = min(128, max(16, next_pow2(d)))
    _row_terms_kernel[(cdiv(k, 64), g)](codebook, bias, scale, k, d, *codebook.stride(),
                                               COSINE=cosine, BLOCK_K=64, BLOCK_D=bd)
    return bias, scale


def _check(x: Tensor, codebook: Tensor, metric: str, precision: str, algorithm: str) -> None:
    if x.ndim not in (2, 3) or codebook.ndim != x.ndim or x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"expected x (N, d) and codebook (K, d), or (G, N, d) and (G, K, d); "
                         f"got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if x.ndim == 3 and x.shape[0] != codebook.shape[0]:
        raise ValueError(f"x has {x.shape[0]} groups but codebook has {codebook.shape[0]}")
    if codebook.shape[-2] < 1 or codebook.shape[-2] >= 2**31 - 1:
        raise ValueError(f"codebook size must be in [1, 2^31 - 1), got {codebook.shape[-2]}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"unknown metric {metric!r}; expected 'l2' or 'cosine'")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    if x.device != codebook.device:
        raise ValueError(f"x on {x.device} but codebook on {codebook.device}")


def _common(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Same float dtype for both (bf16, fp16 or fp32; anything else goes to fp32)."""
    dt = torch.promote_types(x.dtype, codebook.dtype)
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        dt = torch.float32
    return x.to(dt), codebook.to(dt)


def new_outputs(x: Tensor, write_dist: bool, *tail: int) -> tuple[Tensor, Tensor]:
    """Unwritten fp32 distances (empty unless ``write_dist``) and int64 indices, each
    ``(G, N, *tail)`` for ``x (G, N, d)``."""
    shape = (*x.shape[:2], *tail)
    dist = torch.empty(shape, device=x.device, dtype=torch.float32) if write_dist else x.new_empty(0, dtype=torch.float32)
    return dist, torch.empty(shape, device=x.device, dtype=torch.int64)


def _nearest_top1(x: Tensor, codebook: Tensor, cosine: bool, precision: str, write_dist: bool,
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
    _merge_kernel[(cdiv(n, 256), g)](part_s, part_i, off, dist, idx, n, s, COSINE=cosine,
                                            WRITE_DIST=write_dist, BLOCK=256)
    return dist, idx


def _nearest_impl(x: Tensor, codebook: Tensor, metric: str, k: int, precision: str, return_dist: bool,
                  split_k: int, algorithm: str = "auto", plan: SearchPlan = DEFAULT_PLAN) -> tuple[Tensor, Tensor]:
    _check(x, codebook, metric, precision, algorithm)
    grouped = x.ndim == 3
    xg, cg = _common(x if grouped else x[None], codebook if grouped else codebook[None])
    split = split_k if split_k > 0 else None
    packed = _packed()
    if k == 0 and algorithm != "tiled" and packed.applies(xg.dtype, xg.shape[-1], metric, precision, *cg.shape[:2],
                                                          plan=plan):
        dist, idx = packed.nearest_packed(xg, cg, return_dist, split, plan=plan)
    elif k == 0:
        dist, idx = _nearest_top1(xg, cg, metric == "cosine", precision, return_dist, split, plan)
    else:
        from tokenizers_vq.kernels.topk import nearest_topk  # noqa: PLC0415

        dist, idx = nearest_topk(xg, cg, k, metric == "cosine", precision, return_dist, split)
    if not grouped:
        dist, idx = (dist[0] if return_dist else dist), idx[0]
    return dist, idx


@torch.library.custom_op("tokenizers_vq::nearest_codes", mutates_args=())
def _nearest_op(x: Tensor, codebook: Tensor, metric: str, k: int, precision: str, return_dist: bool,
                split_k: int, algorithm: str = "auto") -> tuple[Tensor, Tensor]:
    return _nearest_impl(x, codebook, metric, k, precision, return_dist, split_k, algorithm)


def _packed():
    from tokenizers_vq.kernels import packed  # noqa: PLC0415  (imports this module)

    return packed


@_nearest_op.register_fake
def _(x, codebook, metric, k, precision, return_dist, split_k, algorithm="auto"):
    shape = x.shape[:-1] + ((k,) if k > 0 else ())
    dist = x.new_empty(shape if return_dist else (0,), dtype=torch.float32)
    return dist, x.new_empty(shape, dtype=torch.int64)


def nearest_codes_triton(x: Tensor, codebook: Tensor, metric: str = "l2", k: int | None = None,
                         return_dist: bool = True, precision: str = "tf32",
                         split_k: int | None = None, algorithm: str = "auto",
                         plan: SearchPlan | None = None) -> tuple[Tensor | None, Tensor]:
    """Nearest codeword(s) of each row, fused: never materialises ``N x K``.

    Accepts ``x (N, d)`` with ``codebook (K, d)``, or ``G`` codebooks in one launch as
    ``x (G, N, d)`` with ``codebook (G, K, d)``; any ``d >= 1``, any ``K >= 1``, any
    strides; fp32, bf16 or fp16 (mixed inputs are promoted; dot products accumulate in
    fp32). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

    Args:
        x: queries ``(N, d)`` or ``(G, N, d)``.
        codebook: codewords ``(K, d)`` or ``(G, K, d)``.
        metric: ``"l2"`` (squared Euclidean incl. ``|x|^2``, clamped at 0) or
            ``"cosine"`` (``1 - cos``), as :func:`nearest_codes_reference`.
        k: ``None`` for the nearest code; ``1 <= k <= min(8, K)`` for the ``k`` nearest,
            ascending (adds a trailing ``k`` axis to both outputs).
        return_dist: when False the distances are not written and ``None`` is returned.
        precision: fp32 dot products as ``"tf32"`` (tensor cores, default),
            ``"tf32x3"`` or ``"ieee"`` (exact fp32 products: indices match fp32 math).
            Ignored for 16-bit inputs.
        split_k: programs per row block over the codebook; ``None`` picks it from the
            GPU size (more when ``N`` is small).
        plan: the kernels' tuning choices (:class:`~tokenizers_vq.kernels.plan.SearchPlan`;
            default :data:`~tokenizers_vq.kernels.plan.DEFAULT_PLAN`), eager calls only.
        algorithm: ``"auto"`` (default; ``"packed"`` is the same) runs the packed
            kernel of :mod:`tokenizers_vq.kernels.packed` where it applies: ``l2``,
            ``k=None``, bf16 with ``d <= 256``, or fp32 with ``"tf32"`` and ``d <= 58``
            (bf16 d 11-16 and 27-32 pad to a row twice as wide; a second dot, or at
            123-128 and 251-256 an initial accumulator, holds the norms for fp32 d 11-16
            and 27-32, and in bf16 for 59-64, 123-128 and 251-256;
            the augmented codebook copy is capped at 64 MiB). Everything else runs the tiled kernel,
            which ``"tiled"`` forces. The packed
            kernel's indices may also differ from the exact argmin on near-ties
            within a relative ``2^-13`` of the distance (then the lowest index wins).

    Returns:
        ``(dist, idx)``: fp32 and int64, shaped ``(N,)`` / ``(G, N)`` (``(..., k)`` with
        ``k``). Ties go to the lowest index.
    """
    if k is not None and not 1 <= k <= min(8, codebook.shape[-2]):
        raise ValueError(f"k must be in [1, min(8, K)], got {k}")
    # the custom op is for torch.compile and fake tensors; an eager call on plain tensors
    # skips its dispatch (about 15 us of Python per call, measured by eval.benchmarks.host_cost)
    eager = type(x) is Tensor and type(codebook) is Tensor and not torch.compiler.is_compiling()
    if eager:
        dist, idx = _nearest_impl(x, codebook, metric, k or 0, precision, return_dist, split_k or 0, algorithm,
                                  plan or DEFAULT_PLAN)
    elif plan is not None and plan != DEFAULT_PLAN:
        raise ValueError("a search plan other than the default is for eager calls on plain tensors (tests, tuning); "
                         "under torch.compile or with tensor subclasses the custom op runs the default")
    else:
        dist, idx = _nearest_op(x, codebook, metric, k or 0, precision, return_dist, split_k or 0, algorithm)
    return (dist if return_dist else None), idx
