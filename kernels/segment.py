"""Per-code EMA statistics by segment reduction (Triton), without a one-hot.

``counts[k] = #{n : idx_n = k}`` and ``sums[k] = sum_{n : idx_n = k} x_n`` in fp32.
The rows are sorted by code once (a stable sort), so code ``k`` owns the contiguous
segment ``order[start_k : start_{k+1}]``. The sorted rows are then cut into chunks of equal
length, whatever the codes: one program per chunk (and block of columns) sums each run of equal
codes in it by a segmented scan and stores a run that is its code's whole segment; a run cut by a
chunk's edge is stored as a piece, and a second launch adds each cut code's pieces in chunk
order (and writes the counts, and zeros for unused codes). The work per program is the same
however the rows fall on codes (a popular code's rows are spread over many chunks), and the
order of every addition is fixed: no atomics, the result is bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenizers_vq.kernels import _compat  # noqa: F401  (interpreter fix, before any launch)
from tokenizers_vq.kernels import relaunch
from tokenizers_vq.kernels._host import cdiv, int32_columns, next_pow2, plain_eager


@triton.jit
def _carry_sum(fa, va, fb, vb):
    """The segmented sum's step: a run that starts at ``b`` does not add what came before."""
    return fa | fb, tl.where(fb != 0, vb, va + vb)


@triton.jit
def _run_sum_kernel(X, ORDER, KEYS, START, SUMS, PIECES, N, K, D, sxn, sxd,
                    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_C), column blocks)``: sums the runs of equal codes among the sorted
    rows ``c * BLOCK_C <= r < (c + 1) * BLOCK_C``. A run that is its code's whole segment goes to
    ``SUMS[code]``; one cut by the chunk's edge to ``PIECES[2 c]`` if it starts the chunk, else to
    ``PIECES[2 c + 1]`` (it ends the chunk). Codes outside ``[0, K)`` are left out."""
    c = tl.program_id(0)
    lo = c * BLOCK_C
    hi = tl.minimum(lo + BLOCK_C, N)
    rr = lo + tl.arange(0, BLOCK_C)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = rr < hi
    key = tl.load(KEYS + rr, mask=rm, other=-1).to(tl.int32)
    prev = tl.load(KEYS + rr - 1, mask=rm & (rr > lo), other=-1).to(tl.int32)
    nxt = tl.load(KEYS + rr + 1, mask=rr + 1 < hi, other=-1).to(tl.int32)
    valid = rm & (key >= 0) & (key < K)
    rows = tl.load(ORDER + rr, mask=valid, other=0)
    xv = tl.load(X + rows[:, None] * sxn + dd[None, :] * sxd, mask=valid[:, None] & (dd < D)[None, :],
                 other=0.0).to(tl.float32)
    first = (rr == lo) | (key != prev)
    flags = tl.broadcast_to(first.to(tl.int32)[:, None], (BLOCK_C, BLOCK_D))
    _, run = tl.associative_scan((flags, xv), axis=0, combine_fn=_carry_sum)
    last = valid & ((rr + 1 == hi) | (key != nxt))  # the row that holds its run's sum
    code = tl.where(valid, key, 0)
    seg_lo = tl.load(START + code, mask=last, other=0)
    seg_hi = tl.load(START + code + 1, mask=last, other=0)
    whole = (seg_lo >= lo) & (seg_hi <= hi)
    cols = (dd < D)[None, :]
    tl.store(SUMS + code.to(tl.int64)[:, None] * D + dd[None, :], run, mask=(last & whole)[:, None] & cols)
    slot = 2 * c + tl.where(seg_lo <= lo, 0, 1)
    tl.store(PIECES + slot.to(tl.int64)[:, None] * D + dd[None, :], run, mask=(last & ~whole)[:, None] & cols)


@triton.jit
def _join_pieces_kernel(START, PIECES, SUMS, COUNTS, K, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(K, column blocks)``: the sum of a code whose segment crosses chunks, its pieces added
    in chunk order; zeros for an unused code; ``COUNTS[k]`` the segment's length (fp32)."""
    k = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dd < D
    seg_lo = tl.load(START + k)
    seg_hi = tl.load(START + k + 1)
    if tl.program_id(1) == 0:
        tl.store(COUNTS + k, (seg_hi - seg_lo).to(tl.float32))
    if seg_hi == seg_lo:
        tl.store(SUMS + k * D + dd, tl.zeros([BLOCK_D], dtype=tl.float32), mask=dm)
    else:
        c_lo = seg_lo // BLOCK_C
        c_hi = (seg_hi - 1) // BLOCK_C
        if c_lo != c_hi:
            acc = tl.load(PIECES + (2 * c_lo + tl.where(seg_lo == c_lo * BLOCK_C, 0, 1)) * D + dd, mask=dm, other=0.0)
            for c in range(c_lo + 1, c_hi + 1):
                acc += tl.load(PIECES + (2 * c) * D + dd, mask=dm, other=0.0)
            tl.store(SUMS + k * D + dd, acc, mask=dm)


def _code_statistics(x: Tensor, idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    sums = torch.empty(size, d, device=x.device, dtype=torch.float32)
    counts = torch.empty(size, device=x.device, dtype=torch.float32)
    # the narrowest key that holds every code: a radix sort makes one pass per key byte
    key = torch.int16 if size < torch.iinfo(torch.int16).max else torch.int32 if size < 2**31 - 1 else torch.int64
    flat = idx.reshape(-1).long()  # any integer dtype in (uint8 included), then narrowed
    if key != torch.int64:
        flat = flat.clamp(-1, size).to(key)  # out-of-range codes stay out of range
    sorted_idx, order = torch.sort(flat, stable=True)
    # start[k] = first sorted position with code >= k; codes outside [0, size) are ignored.
    start = torch.searchsorted(sorted_idx, torch.arange(size + 1, device=x.device, dtype=key))
    block_d = min(64, max(16, next_pow2(d)))
    sum_runs(x, order, sorted_idx, start, sums, counts, max(16, min(256, 4096 // block_d)), block_d)
    return counts, sums


def sum_runs(x: Tensor, order: Tensor, sorted_idx: Tensor, start: Tensor, sums: Tensor, counts: Tensor,
             block_c: int, block_d: int, num_warps: int = 4) -> None:
    """The two launches that fill ``sums (K, d)`` and ``counts (K,)`` from the sorted rows (``order``,
    their codes ``sorted_idx``, each code's first position ``start (K + 1,)``), ``block_c`` sorted rows a
    chunk and ``block_d`` columns a block (``eval/gpu/segment_sweep.py`` times them at every setting)."""
    (n, d), size = x.shape, counts.shape[0]
    chunks, col_blocks = cdiv(n, block_c), max(1, cdiv(d, block_d))
    pieces = torch.empty(2 * chunks, d, device=x.device, dtype=torch.float32)
    if n:
        relaunch.launch(_run_sum_kernel, (chunks, col_blocks), x, order, sorted_idx, start, sums, pieces, n, size, d,
                        *x.stride(), BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps)
    if size:
        relaunch.launch(_join_pieces_kernel, (size, col_blocks), start, pieces, sums, counts, size, d,
                        BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps)


def _checked_statistics(x: Tensor, idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or idx.shape != x.shape[:1]:
        raise ValueError(f"expected x (N, d) and idx (N,); got {tuple(x.shape)} and {tuple(idx.shape)}")
    if size < 0:
        raise ValueError(f"the number of codes must be >= 0, got {size}")
    return _code_statistics(int32_columns(x), idx, size)


@torch.library.custom_op("tokenizers_vq::code_statistics", mutates_args=())
def _code_statistics_op(x: Tensor, idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    return _checked_statistics(x, idx, size)


@_code_statistics_op.register_fake
def _(x, idx, size):
    return x.new_empty(size, dtype=torch.float32), x.new_empty(size, x.shape[1], dtype=torch.float32)


def code_statistics_triton(x: Tensor, idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per-code counts and sums of assigned rows, as :func:`tokenizers_vq.quantizers.code_statistics`
    (which calls this on CUDA).

    Accepts ``x (N, d)`` of any float dtype and strides and integer ``idx (N,)``;
    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. Extra memory is
    ``O(N + K)`` (the sort) plus fp32 pieces of the runs cut by chunk edges, at most
    ``2 d N / 16`` values (4 MiB at ``N = 32768``, ``d = 256``); never ``N x K``.

    Args:
        x: ``(N, d)`` latents.
        idx: ``(N,)`` code of each row, in ``[0, size)``.
        size: number of codes ``K``.

    Returns:
        ``(counts, sums)``: fp32 ``(K,)`` and ``(K, d)``.
    """
    size = int(size)  # (a NumPy integer too)
    relaunch.check_device(x, "code_statistics_triton", "use tokenizers_vq.quantizers.code_statistics, which runs "
                          "the torch version there")
    if plain_eager(x, idx):
        return _checked_statistics(x, idx, size)
    return _code_statistics_op(x, idx, size)
