"""The one place the library talks to ``torch.distributed``.

Codebook statistics (EMA counts and sums, k-means sums) are summed over ranks and
random choices (k-means seeds, dead-code replacements) are made on rank 0 and
broadcast, so every rank ends a step with bit-identical codebooks. Without an
initialised process group every helper is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (identical result on every rank); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s value; returns ``t``."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def sample_rows(x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` rows drawn (with replacement) from ``x`` ``(N, d)`` on rank 0 and sent
    to every rank, so all ranks hold the same ``(n, d)`` sample."""
    idx = torch.randint(0, x.shape[0], (n,), device=x.device, generator=generator)
    rows = x[idx].contiguous()
    return broadcast_(rows)


def mean_over_ranks(t: Tensor) -> Tensor:
    """Differentiable mean of ``t`` over ranks (``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_reduce  # noqa: PLC0415 (only when distributed)

    return all_reduce(t) / dist.get_world_size()
