"""Chunked-GEMM nearest-codeword search for wide rows (issue 3): the default top-1 ``l2``
search of 16-bit rows with ``d >= GEMM_MIN_D``.

At large ``d`` the search is a matrix product (``2 N K d`` flops against ``N K`` epilogue
operations), and the fused Triton kernels (:mod:`~tokenizers_vq.kernels.nearest`) reach
about 45% of the bf16 tensor-core rate there (``results/sweep_h100.md``). Here the
vendor GEMM computes ``P = x c^T`` (fp32 accumulation, fp32 out) for one bounded block of
rows and codes at a time, into one reused buffer of at most ``CHUNK_BYTES``; a Triton
pass folds each block into every row's running ``(score, index)``, with the score of
v1, ``s = |c|^2 / 2 - x.c``; a last pass turns the score into ``|x|^2 + 2 s``. Nothing
``N x K`` is materialised: extra memory is the block buffer plus ``12`` bytes per row and
``8`` per code.

Ties go to the lowest index: inside a block, the lowest column of the row's least score;
across blocks (walked in index order), strict ``<`` keeps the earlier block.

Accuracy: the same fp32 products and accumulation as v1 (only the summation order
differs), so v1's error bound holds. On CPU tensors under ``TRITON_INTERPRET=1`` (the
tests) the block product is an fp32 ``torch.mm`` of the upcast operands.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenizers_vq.kernels.nearest import _interpret, aligned, codeword_terms, new_outputs

GEMM_MIN_D = 1024  # 16-bit rows this wide run here by default (H100 sweep, results/sweep_h100.md "gemm")
CHUNK_BYTES = 56 << 20  # the fp32 block buffer: fewer, larger blocks cost less host time; under issue 3's 64 MiB
CHUNK_ROWS = 8192  # rows per block (fewer when N is smaller); codes per block fill CHUNK_BYTES
FOLD_ROWS, FOLD_COLS = 16, 256  # fold tile: BLOCK_R rows, BLOCK_C columns per step


@functools.cache
def _mm_fp32_out(device_index: int) -> bool:
    """Whether this torch has the 16-bit x 16-bit -> fp32 ``mm`` on CUDA (``out_dtype``, torch >= 2.8)."""
    a = torch.ones(16, 16, device=f"cuda:{device_index}", dtype=torch.bfloat16)
    try:
        out = torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return out.dtype == torch.float32 and bool((out == 16).all())


def applies(dtype: torch.dtype, d: int, metric: str, device: torch.device, min_d: int | None = None) -> bool:
    """Whether the chunked-GEMM path can run for these inputs (``min_d``: default ``GEMM_MIN_D``;
    ``0`` when the path is forced)."""
    if metric != "l2" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if d < (GEMM_MIN_D if min_d is None else min_d):
        return False
    if device.type == "cuda":
        return not _interpret() and _mm_fp32_out(device.index if device.index is not None
                                                 else torch.cuda.current_device())
    return _interpret()


@triton.jit
def _fold_kernel(P, BIAS, BEST_S, BEST_I, R, KC, k0, ldp, FIRST: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fold block ``P (R, KC)`` (``x.c`` of codes ``k0 .. k0 + KC``) into the running
    ``BEST_S`` (fp32) / ``BEST_I`` (int32) of its ``R`` rows; ``FIRST``: no earlier block."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_C)
    p_row = P + rows[:, None].to(tl.int64) * ldp
    best = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
    best_t = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for t in range(0, tl.cdiv(KC, BLOCK_C)):
        cc = t * BLOCK_C + cols
        cmask = cc < KC
        p = tl.load(p_row + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        b = tl.load(BIAS + k0 + cc, mask=cmask, other=float("inf"))
        s = b[None, :] - p
        lt = s < best  # strict: the earlier column step keeps a tie
        best = tl.where(lt, s, best)
        best_t = tl.where(lt, t, best_t)
    m = tl.min(best, axis=1)
    col = tl.min(tl.where(best == m[:, None], best_t * BLOCK_C + cols[None, :], KC), axis=1)
    i = k0 + tl.where(col < KC, col, 0)  # a row of NaN / inf scores falls back to the block's first code
    if FIRST:
        tl.store(BEST_S + rows, m, mask=rmask)
        tl.store(BEST_I + rows, i, mask=rmask)
    else:
        old = tl.load(BEST_S + rows, mask=rmask, other=0.0)
        lt = m < old  # strict: the earlier block keeps a tie
        tl.store(BEST_S + rows, tl.where(lt, m, old), mask=rmask)
        tl.store(BEST_I + rows, tl.where(lt, i, tl.load(BEST_I + rows, mask=rmask, other=0)), mask=rmask)


@triton.jit
def _finish_kernel(X, BEST_S, BEST_I, DIST, IDX, N, D, sxg, sxn, sxd, WRITE_DIST: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dist = max(|x|^2 + 2 s, 0)`` (fp32 ``|x|^2`` in ``BLOCK_D`` chunks) and int64 indices."""
    g = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    if WRITE_DIST:
        dd = tl.arange(0, BLOCK_D)
        x_row = X + g * sxg + rows[:, None].to(tl.int64) * sxn
        x_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            xc = tl.load(x_row + (d0 + dd[None, :]) * sxd, mask=rmask[:, None] & (d0 + dd[None, :] < D), other=0.0)
            xc = xc.to(tl.float32)
            x_sq += tl.sum(xc * xc, axis=1)
        s = tl.load(BEST_S + g * N + rows, mask=rmask, other=0.0)
        tl.store(DIST + g * N + rows, tl.maximum(x_sq + 2.0 * s, 0.0), mask=rmask)
    tl.store(IDX + g * N + rows, tl.load(BEST_I + g * N + rows, mask=rmask, other=0).to(tl.int64), mask=rmask)


def plan(n: int, k: int) -> tuple[int, int]:
    """``(rows, codes)`` of one block: ``min(N, CHUNK_ROWS)`` rows, and as many codes (a
    multiple of 256, at least 256, at most ``K``) as fit in ``CHUNK_BYTES`` of fp32
    (both read per call: the tests shrink them to force many blocks)."""
    rows = max(1, min(n, CHUNK_ROWS))
    codes = max(256, CHUNK_BYTES // (4 * rows) // 256 * 256)
    return rows, min(k, codes)


def _block_product(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b`` in fp32 from 16-bit operands (the vendor GEMM on CUDA)."""
    if a.is_cuda:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:  # interpreter tests: the same products, upcast
        torch.mm(a.float(), b.float(), out=out)


def nearest_gemm(x: Tensor, codebook: Tensor, write_dist: bool,
                 chunk: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Top-1 ``l2`` search on grouped ``x (G, N, d)`` / ``codebook (G, K, d)`` (both bf16 or
    both fp16, any strides); returns ``(G, N)`` fp32 distances (empty unless
    ``write_dist``) and int64 indices. ``chunk``: ``(rows, codes)`` per block (default :func:`plan`)."""
    g, n, d = x.shape
    k = codebook.shape[1]
    dist, idx = new_outputs(x, write_dist)
    if n == 0:
        return dist, idx
    bias, _ = codeword_terms(codebook, False)  # |c|^2 / 2, (G, K) fp32
    rows, codes = chunk or plan(n, k)
    buf = torch.empty(rows * codes, device=x.device, dtype=torch.float32)
    seg = aligned(g * n)
    best = torch.empty(2 * seg, device=x.device, dtype=torch.float32)  # one allocation
    best_s, best_i = best[:g * n].view(g, n), best[seg:seg + g * n].view(torch.int32).view(g, n)
    # Host time per block (a GEMM and a fold launch) is what bounds the call at large blocks counts:
    # views are made once, outside the block loop.
    views: dict = {}
    for gi in range(g):
        blocks = [(k0, min(codes, k - k0), codebook[gi, k0:k0 + codes].T) for k0 in range(0, k, codes)]
        bias_g = bias[gi]
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            xr, bs, bi = x[gi, r0:r0 + r], best_s[gi, r0:], best_i[gi, r0:]
            grid = (triton.cdiv(r, FOLD_ROWS),)
            for k0, kc, ct in blocks:
                p = views.get((r, kc))
                if p is None:
                    p = views[r, kc] = buf[:r * kc].view(r, kc)
                _block_product(xr, ct, p)
                _fold_kernel[grid](p, bias_g, bs, bi, r, kc, k0, kc, FIRST=k0 == 0, BLOCK_R=FOLD_ROWS,
                                   BLOCK_C=FOLD_COLS, num_warps=4)
    _finish_kernel[(triton.cdiv(n, 64), g)](x, best_s, best_i, dist, idx, n, d, *x.stride(), WRITE_DIST=write_dist,
                                            BLOCK=64, BLOCK_D=128)
    return dist, idx
