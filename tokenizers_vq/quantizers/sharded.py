"""Nearest-code search over a codebook sharded across ranks.

Each rank holds ``K / world`` codes (rank ``r`` holds global ids
``[offset_r, offset_r + K_r)``). The queries of every rank are gathered, each rank
searches its shard for all of them, and the global nearest code is the
all-reduced minimum distance, ties going to the lowest global index (a second
all-reduce of the candidate indices), as in the unsharded search.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from tokenizers_vq.distributed import is_distributed
from tokenizers_vq.quantizers._functional import Backend, Metric, nearest_codes


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """``(offset, count)`` of rank ``rank``'s shard of a ``size``-code codebook
    (the first ``size % world`` ranks hold one code more)."""
    base, extra = divmod(size, world)
    offset = rank * base + min(rank, extra)
    return offset, base + (rank < extra)


@torch.no_grad()
def sharded_nearest_codes(
    x: Tensor, shard: Tensor, offset: int, metric: Metric = "l2", backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    """Global nearest code of this rank's queries.

    Args:
        x: ``(N, d)`` this rank's queries (``N`` equal on every rank).
        shard: ``(K_r, d)`` this rank's codes, global ids ``offset + i``.

    Returns:
        ``(dist, idx)``: ``(N,)`` fp32 distances and int64 global indices.
    """
    if not is_distributed():
        dist_, idx = nearest_codes(x, shard, metric, backend)
        return dist_, idx + offset
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.contiguous())
    queries = torch.cat(gathered)
    d_loc, i_loc = nearest_codes(queries, shard, metric, backend)
    best = d_loc.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MIN)
    sentinel = torch.iinfo(torch.int64).max
    cand = torch.where(d_loc == best, i_loc + offset, torch.full_like(i_loc, sentinel))
    dist.all_reduce(cand, op=dist.ReduceOp.MIN)
    n = x.shape[0]
    return best[rank * n : (rank + 1) * n], cand[rank * n : (rank + 1) * n]
