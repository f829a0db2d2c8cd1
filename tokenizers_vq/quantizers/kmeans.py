"""Lloyd's k-means over :func:`nearest_codes`, shared by the projected codebook's
initialisation and codebook shrinking."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenizers_vq import distributed as tdist
from tokenizers_vq.quantizers._functional import Backend, Metric, code_statistics, l2norm, nearest_codes


@torch.no_grad()
def kmeans(
    x: Tensor,
    k: int,
    iters: int = 10,
    metric: Metric = "l2",
    weights: Tensor | None = None,
    reduce_over_ranks: bool = False,
    backend: Backend = "auto",
    generator: torch.Generator | None = None,
    balance: float = 0.0,
    balance_rounds: int = 6,
) -> tuple[Tensor, Tensor]:
    """Cluster the rows of ``x`` into ``k`` centres.

    Centres start at ``k`` distinct rows (with ``reduce_over_ranks``, drawn on rank 0 and
    broadcast; else each process clusters its own rows and needs no other rank); a centre
    left empty by an iteration moves to the row farthest from its centre, so all
    ``k`` centres stay in use whenever ``x`` has ``k`` distinct rows.

    Args:
        x: ``(N, d)`` points, ``N >= k``.
        k: number of centres.
        iters: Lloyd iterations.
        metric: ``"l2"`` or ``"cosine"`` (centres are then unit vectors).
        weights: optional ``(N,)`` non-negative weight of each point (e.g. usage
            counts of codewords being merged).
        reduce_over_ranks: sum the cluster statistics over ``torch.distributed``
            ranks (for latents that differ per rank).
        backend: nearest-code search backend, see :func:`nearest_codes`.
        generator: random generator of the seeding.
        balance: after the Lloyd iterations, centres holding fewer than ``balance``
            times the mean cluster size move to points drawn in proportion to their
            cluster's size (so big clusters split), then 2 more Lloyd iterations; up to
            ``balance_rounds`` rounds. Evens out the cluster sizes, so that fewer codes
            sit where held-out data rarely goes (``0``: plain k-means).
        balance_rounds: most re-seeding rounds of ``balance``.

    Returns:
        ``(centres, counts)``: ``(k, d)`` fp32 centres and ``(k,)`` fp32 (weighted)
        number of points assigned to each in the last iteration.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects x of shape (N, d), got {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans needs 1 <= k <= N; got k={k} for {x.shape[0]} points")
    if weights is not None and (weights.ndim != 1 or weights.shape[0] != x.shape[0]):
        raise ValueError(f"kmeans weights must be (N,) = ({x.shape[0]},), one per point; got {tuple(weights.shape)}")
    x = x.float()
    if metric == "cosine":
        x = l2norm(x)
    w = None if weights is None else weights.float().reshape(-1, 1)
    perm = torch.randperm(x.shape[0], generator=generator, device="cpu")[:k].to(x.device)
    centres = _rows(x, perm, reduce_over_ranks)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        centres, counts, idx = _lloyd_step(x, w, centres, metric, backend, reduce_over_ranks)
    for _ in range(balance_rounds if balance > 0 and iters > 0 else 0):
        small = (counts < balance * counts.mean()).nonzero().squeeze(1)
        if small.numel() == 0:  # one host sync per round, outside the training step
            break
        size = counts[idx]  # each point drawn in proportion to its cluster's size
        rows = torch.arange(x.shape[0], device=x.device)
        if x.shape[0] > 2**24:  # torch.multinomial's limit on categories
            rows = torch.randperm(x.shape[0], generator=generator, device="cpu")[: 2**24].to(x.device)
        gen = generator if generator is None or generator.device == x.device else None
        pick = rows[torch.multinomial(size[rows], min(small.numel(), rows.numel()), replacement=False, generator=gen)]
        centres[small[: pick.numel()]] = _rows(x, pick, reduce_over_ranks)
        for _ in range(2):
            centres, counts, idx = _lloyd_step(x, w, centres, metric, backend, reduce_over_ranks)
    return centres, counts


def _rows(x: Tensor, idx: Tensor, reduce_over_ranks: bool) -> Tensor:
    """Rows ``idx`` of ``x``: rank 0's on every rank when the ranks cluster together, else this process's own."""
    rows = x[idx].contiguous()
    return tdist.broadcast_(rows) if reduce_over_ranks else rows


def _lloyd_step(x: Tensor, w: Tensor | None, centres: Tensor, metric: Metric, backend: Backend,
                reduce_over_ranks: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One Lloyd iteration: new ``(centres, counts)`` and the assignment ``idx`` they were
    computed from. A centre left empty moves to the row farthest from its centre."""
    k = centres.shape[0]
    dist, idx = nearest_codes(x, centres, metric, backend)
    if w is None:
        counts, sums = code_statistics(x, idx, k)
    else:
        counts, sums = code_statistics(x * w, idx, k)
        counts = torch.zeros(k, device=x.device).index_add_(0, idx, w.squeeze(1))
    if reduce_over_ranks:
        stats = tdist.all_reduce_sum_(torch.cat([counts.unsqueeze(1), sums], 1))
        counts, sums = stats[:, 0], stats[:, 1:]
    means = sums / counts.clamp_min(1e-12).unsqueeze(1)
    if metric == "cosine":
        means = l2norm(means)
    centres = torch.where(counts.unsqueeze(1) > 0, means, centres)
    empty = (counts <= 0).nonzero().squeeze(1)
    if empty.numel():  # one host sync per iteration; k-means runs outside the training step
        far = dist.topk(min(empty.numel(), x.shape[0])).indices
        centres[empty[: far.numel()]] = _rows(x, far, reduce_over_ranks)
    return centres, counts, idx
