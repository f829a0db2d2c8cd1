"""Per-code EMA statistics by segment reduction (Triton), without a one-hot.

``counts[k] = #{n : idx_n = k}`` and ``sums[k] = sum_{n : idx_n = k} x_n`` in fp32.
The rows are sorted by code once (a stable sort), so code ``k`` owns the contiguous
segment ``order[start_k : start_{k+1}]``; one program per (code, column block, part) adds
the rows of its part of the segment in a fixed order (with few codes a segment is cut into up
to 8 parts, summed after in a fixed order). No atomics: the result is bitwise reproducible.
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
def _segment_sum_kernel(X, ORDER, START, SUMS, COUNTS, K, D, sxn, sxd, SPLITS,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(K, column blocks, SPLITS)``: ``SUMS[s, k, cols] = sum_r X[ORDER[r], cols]`` over
    the ``s``-th of ``SPLITS`` equal parts of ``START[k] <= r < START[k + 1]``, accumulated
    in fp32 (the parts let a popular code's long segment be summed by several programs), and
    ``COUNTS[k]`` the segment's length (fp32)."""
    k = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2).to(tl.int64)
    dmask = dd < D
    seg_lo = tl.load(START + k)
    seg_hi = tl.load(START + k + 1)
    part = (seg_hi - seg_lo + SPLITS - 1) // SPLITS
    lo = seg_lo + split * part
    hi = tl.minimum(seg_hi, lo + part)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(lo, hi, BLOCK_R):
        rmask = r0 + rr < hi
        rows = tl.load(ORDER + r0 + rr, mask=rmask, other=0)
        xv = tl.load(X + rows[:, None] * sxn + dd[None, :] * sxd, mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc += xv.to(tl.float32)
    tl.store(SUMS + (split * K + k) * D + dd, tl.sum(acc, axis=0), mask=dmask)
    if (tl.program_id(1) == 0) & (split == 0):
        tl.store(COUNTS + k, (seg_hi - seg_lo).to(tl.float32))


def _code_statistics(x: Tensor, idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    sums = torch.empty(size, d, device=x.device, dtype=torch.float32)
    # the narrowest key that holds every code: a radix sort makes one pass per key byte
    key = torch.int16 if size < torch.iinfo(torch.int16).max else torch.int32 if size < 2**31 - 1 else torch.int64
    flat = idx.reshape(-1).long()  # any integer dtype in (uint8 included), then narrowed
    if key != torch.int64:
        flat = flat.clamp(-1, size).to(key)  # out-of-range codes stay out of range
    sorted_idx, order = torch.sort(flat, stable=True)
    # start[k] = first sorted position with code >= k; codes outside [0, size) are ignored.
    start = torch.searchsorted(sorted_idx, torch.arange(size + 1, device=x.device, dtype=key))
    counts = torch.empty(size, device=x.device, dtype=torch.float32)
    block_d = min(128, max(16, next_pow2(d)))
    block_r = max(1, min(16, 2048 // block_d))
    # few codes: each segment in up to 8 parts (summed in a fixed order after), so that one
    # popular code's rows do not leave a single program running long after the others
    splits = max(1, min(8, 8192 // max(size, 1)))
    parts = sums if splits == 1 else torch.empty(splits, size, d, device=x.device, dtype=torch.float32)
    relaunch.launch(_segment_sum_kernel, (size, max(1, cdiv(d, block_d)), splits), x, order, start, parts, counts, size, d,
                    *x.stride(), splits, BLOCK_R=block_r, BLOCK_D=block_d)
    if splits > 1:
        torch.sum(parts, dim=0, out=sums)
    return counts, sums


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
    ``O(N + K)`` (the sort) plus, below 4,096 codes, fp32 partial sums ``(parts, K, d)`` of at
    most ``8192 d`` values (8 MiB at ``d = 256``); never ``N x K``.

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
