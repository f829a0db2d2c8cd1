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
from tokenizers_vq.quantizers._functional import BACKENDS, Backend, Metric, nearest_codes
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_choice, check_float32_statistics, check_number


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
        x: ``(N, d)`` this rank's queries (``N`` may differ between ranks).
        shard: ``(K_r, d)`` this rank's codes, global ids ``offset + i``.

    Returns:
        ``(dist, idx)``: ``(N,)`` fp32 distances and int64 global indices.
    """
    if not is_distributed():
        dist_, idx = nearest_codes(x, shard, metric, backend)
        return dist_, idx + offset
    queries, start, stop = gather_rows(x)
    d_loc, i_loc = nearest_codes(queries, shard, metric, backend)
    best = d_loc.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MIN)
    sentinel = torch.iinfo(torch.int64).max
    cand = torch.where(d_loc == best, i_loc + offset, torch.full_like(i_loc, sentinel))
    dist.all_reduce(cand, op=dist.ReduceOp.MIN)
    return best[start:stop], cand[start:stop]


def gather_rows(x: Tensor) -> tuple[Tensor, int, int]:
    """All ranks' ``x`` ``(N_r, ...)`` concatenated in rank order, and the ``(start, stop)``
    of this rank's rows in it (``x``, 0, ``N`` when not distributed). Ranks may hold
    different ``N_r`` (the last batch of an epoch): the sizes are exchanged first, one
    host sync, and each rank's rows padded to the largest for the gather."""
    if not is_distributed():
        return x, 0, x.shape[0]
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = torch.cat(sizes).tolist()  # a host sync: the slices below need the numbers
    top = max(counts)
    padded = x.contiguous() if x.shape[0] == top else torch.cat([x, x.new_zeros(top - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    start = sum(counts[:rank])
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), start, start + counts[rank]


class ShardedVectorQuantizer(Quantizer):
    """VQ-EMA whose ``K`` codes are split across ranks: rank ``r`` stores only
    ``shard_bounds(K, r, world)`` codes, so vocabularies of millions of codes fit.

    Every call is collective: all ranks call it together (their batch sizes may differ,
    at the cost of one host sync per call to exchange them). The ranks' latents are
    gathered; each rank searches its shard and the global nearest code comes from
    all-reduced (distance, index) minima, lowest index on ties. Chosen codewords travel back by an all-reduced sum of the owners' rows. The EMA
    statistics of a code are computed only by its owner, from the gathered latents:
    the same sums a reduce-scatter of per-rank statistics gives, without any rank
    holding a ``(K, d)`` temporary. Dead codes are replaced by gathered latents drawn
    with a generator seeded by the step count, so the choice is made the same way on
    every rank.

    Args:
        dim: latent size ``D`` (the lookup is in ``D``).
        codebook_size: total ``K`` over all ranks.
        decay, eps, beta, dead_code_threshold: as in :class:`VectorQuantizer`.
        backend: search backend of each shard.
    """

    exchanges = True  # statistics summed over ranks in a training step

    positionwise = False  # every call is collective: a mask leaving a rank no position would skip it there

    def __init__(
        self, dim: int, codebook_size: int, decay: float = 0.99, eps: float = 1e-5, beta: float = 0.25,
        dead_code_threshold: float = 1.0, backend: Backend = "auto", check_finite: bool = True,
    ):
        super().__init__(dim, check_finite)
        check_number("codebook_size", codebook_size, 1, integer=True)
        check_number("decay", decay, 0, 1, open_high=True)
        check_number("eps", eps, 0, open_low=True)
        check_choice("backend", backend, BACKENDS)
        rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        if codebook_size < world:
            raise ValueError(f"codebook_size={codebook_size} is smaller than the {world} ranks")
        self._size, self.decay, self.eps, self.beta = codebook_size, decay, eps, beta
        self.dead_code_threshold, self.backend = dead_code_threshold, backend
        self.offset, count = shard_bounds(codebook_size, rank, world)
        gen = torch.Generator().manual_seed(0)  # the full codebook's rows, same on every rank
        full_rows = torch.randn(codebook_size, dim, generator=gen)[self.offset : self.offset + count]
        self.register_buffer("embed", full_rows.clone())
        self.register_buffer("embed_sum", full_rows.clone())
        self.register_buffer("cluster_size", torch.ones(count))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))  # this shard's, in total

    @property
    def codebook_size(self) -> int:
        return self._size

    def _search(self, queries: Tensor) -> Tensor:
        """Global indices of the gathered queries (identical on every rank)."""
        d_loc, i_loc = nearest_codes(queries, self.embed, "l2", self.backend)
        if not is_distributed():
            return i_loc + self.offset
        best = d_loc.clone()
        dist.all_reduce(best, op=dist.ReduceOp.MIN)
        cand = torch.where(d_loc == best, i_loc + self.offset, torch.full_like(i_loc, torch.iinfo(torch.int64).max))
        dist.all_reduce(cand, op=dist.ReduceOp.MIN)
        return cand

    def _rows(self, idx: Tensor) -> Tensor:
        """Codewords of global indices ``idx`` (identical on every rank): each owner
        fills its rows, the sum over ranks completes them."""
        mine = (idx >= self.offset) & (idx < self.offset + len(self.embed))
        local = (idx - self.offset).clamp(0, len(self.embed) - 1)
        rows = torch.where(mine.unsqueeze(1), self.embed[local], torch.zeros((), device=idx.device))
        if is_distributed():
            dist.all_reduce(rows)
        return rows

    def _forward(self, z: Tensor) -> QuantizerOutput:
        check_float32_statistics(self, self.cluster_size)
        lead = tuple(z.shape[:-1])
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = z.reshape(-1, z.shape[-1]).float()
            queries, start, stop = gather_rows(x.detach())
            idx_all = self._search(queries)
            q_all = self._rows(idx_all)
            idx, q = idx_all[start:stop], q_all[start:stop]
            if self.training:
                self._update(queries, idx_all)
            losses = {"commitment": self.beta * torch.nn.functional.mse_loss(x, q)}
            quantized = (q + (x - x.detach())).to(z.dtype)
        return QuantizerOutput(quantized.reshape(z.shape), idx.reshape(lead), losses, {})

    @torch.no_grad()
    def _update(self, queries: Tensor, idx: Tensor) -> None:
        count = len(self.embed)
        mine = (idx >= self.offset) & (idx < self.offset + count)
        local = (idx[mine] - self.offset)
        counts = torch.zeros(count, device=queries.device).index_add_(0, local, torch.ones_like(local, dtype=torch.float32))
        sums = torch.zeros_like(self.embed).index_add_(0, local, queries[mine])
        ok = torch.isfinite(sums).all() & torch.isfinite(queries).all()  # (rows whose sum overflows, too)
        if is_distributed():  # each rank summed its own shard: the same answer on every rank
            ok = ok.float().reshape(1)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            ok = ok[0] > 0
        self.cluster_size.lerp_(torch.where(ok, counts, self.cluster_size), 1 - self.decay)
        self.embed_sum.lerp_(torch.where(ok, sums, self.embed_sum), 1 - self.decay)
        total = self.cluster_size.sum()
        if is_distributed():
            dist.all_reduce(total)
        smoothed = (self.cluster_size + self.eps) / (total + self._size * self.eps) * total
        self.embed.copy_(torch.where(ok, self.embed_sum / smoothed.unsqueeze(1), self.embed))
        if self.dead_code_threshold > 0:
            dead = ((self.cluster_size < self.dead_code_threshold) & ok).unsqueeze(1)
            gen = torch.Generator(device="cpu").manual_seed(int(self.steps))
            pick = torch.randint(0, len(queries), (self._size,), generator=gen)[self.offset : self.offset + count]
            fresh = queries[pick.to(queries.device)]
            reset = 2.0 * self.dead_code_threshold
            self.embed.copy_(torch.where(dead, fresh, self.embed))
            self.embed_sum.copy_(torch.where(dead, fresh * reset, self.embed_sum))
            self.cluster_size.copy_(torch.where(dead.squeeze(1), torch.full_like(self.cluster_size, reset), self.cluster_size))
            self.restarts.add_(dead.sum())
        self.steps.add_(1)

    def _decode(self, codes: Tensor) -> Tensor:
        flat, start, stop = gather_rows(codes.reshape(-1).long())
        rows = self._rows(flat)[start:stop]
        return rows.reshape(*codes.shape, self.dim)
