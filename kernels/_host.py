"""Host-side helpers for the kernels' launch code (no Triton: the library's torch path uses
:func:`plain_eager` too)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints: ``triton.cdiv`` is a ``jit`` function whose host call costs
    about 5 us (9 of them were a third of a small call's Python time)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two ``>= n`` (``n >= 1``), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


INT32_MAX = 2**31 - 1
"""The largest offset the kernels compute in int32."""


def int32_columns(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy where its column offsets (``(d - 1) * stride`` of the last
    axis), which the kernels compute in int32, would pass 2^31 (a transposed tensor of that
    many elements)."""
    return t.contiguous() if (t.shape[-1] - 1) * abs(t.stride(-1)) > INT32_MAX else t


def plain_eager(*tensors: Tensor) -> bool:
    """Whether a call on ``tensors`` is eager on plain tensors (not traced by
    ``torch.compile``, no tensor subclass): then the library's custom ops, which exist for
    ``torch.compile`` and fake tensors, are skipped for the function behind them, saving
    their dispatch (about 15 us of Python per call) and, on first use, the import of
    ``torch._dynamo`` (about 0.9 s)."""
    return all(type(t) is Tensor for t in tensors) and not torch.compiler.is_compiling()


def check_fp32_range(x: Tensor, codebook: Tensor) -> None:
    """Refuse float64 values that fp32, which every search computes in, cannot hold (one host
    sync per float64 tensor; other dtypes are not looked at)."""
    for t, name in ((x, "x"), (codebook, "codebook")):
        if t.dtype == torch.float64 and t.numel() and bool((t.isfinite() & (t.abs() > torch.finfo(torch.float32).max)).any()):
            raise ValueError(f"{name} holds float64 values beyond float32's range ({torch.finfo(torch.float32).max:.3g}), "
                             "which the search computes in: scale them down")


@functools.lru_cache(maxsize=256)
def golden_stride(n: int) -> int:
    """The first integer from ``n / phi`` (the golden ratio) up that is coprime with ``n``: its
    multiples mod ``n`` visit each of ``n`` rows once, each next one far from those before."""
    a = max(1, round(n / 1.618033988749895))
    while math.gcd(a, n) != 1:
        a += 1
    return a
