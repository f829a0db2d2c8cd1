"""The one place the library talks to ``torch.distributed``.

Codebook statistics (EMA counts and sums, k-means sums) are summed over ranks and
random choices (k-means seeds, dead-code replacements) are made on rank 0 and
broadcast, so every rank ends a step with bit-identical codebooks. Without an
initialised process group every helper is a no-op.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

from tokenizers_vq.kernels._host import golden_stride


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


def on_every_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce on ``device``; ``flag`` itself
    without a process group): a choice that leads into collective calls, made the same everywhere."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum_(torch.tensor([0.0 if flag else 1.0], device=device))[0] == 0)


def spread_rows(n: int, slots: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Row indices in ``[0, n)`` for ``slots`` (integers >= 0): ``(b + (slot mod n) * a) mod n``
    with one random offset ``b`` drawn on ``slots``' device and ``a`` =
    :func:`tokenizers_vq.kernels._host.golden_stride`:
    distinct for any ``n`` consecutive slots and spread over the rows (a Weyl sequence), for one
    random number where a random permutation of the rows sorts ``n`` keys. Traced by
    ``torch.compile``, where ``n`` may be symbolic (dynamic shapes) and its stride cannot be worked
    out: the order of ``n`` random keys (distinct rows too; the count stays symbolic)."""
    if torch.compiler.is_compiling():
        keys = torch.rand(n, device=slots.device, **({"generator": generator} if generator is not None else {}))
        return keys.argsort()[slots % n]
    offset = torch.randint(n, (1,), device=slots.device, generator=generator)
    return (offset + (slots % n) * golden_stride(n)) % n


def sample_rows(x: Tensor, n: int, generator: torch.Generator | None = None, slots: Tensor | None = None) -> Tensor:
    """``n`` rows of ``x`` ``(N, d)``, drawn on rank 0 and sent to every rank, so all ranks hold the
    same ``(n, d)`` sample: distinct rows while ``n <= N``; past it the order repeats (each row taken
    ``ceil(n / N)`` times at most). Without ``slots`` in a random order (a random permutation);
    with ``slots`` ``(n,)``, row ``i`` is the row :func:`spread_rows` gives ``slots[i]`` (equal
    slots, equal rows)."""
    if slots is None:
        order = torch.randperm(x.shape[0], device=x.device, generator=generator)
        idx = order if n == x.shape[0] else order[torch.arange(n, device=x.device) % x.shape[0]]
    else:
        idx = spread_rows(x.shape[0], slots, generator)
    rows = x[idx].contiguous()
    return broadcast_(rows)


def mean_over_ranks(t: Tensor) -> Tensor:
    """Differentiable mean of ``t`` over ranks (``t`` itself when not distributed)."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_reduce  # noqa: PLC0415 (only when distributed)

    return all_reduce(t) / dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group of several ranks."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def launched_as_ranks() -> bool:
    """Whether ``accelerate launch`` or ``torchrun`` started this process as one of several
    ranks (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(use_cuda: bool = True) -> torch.device:
    """Join the process group that ``accelerate launch`` or ``torchrun`` describes in the
    environment (``WORLD_SIZE`` > 1; NCCL with one GPU per local rank where there are
    GPUs and ``use_cuda``, else gloo) unless one is initialised already; returns this
    rank's device. Ranks that finish early wait for the others for up to a day (the
    default collective timeout, minutes, is too short for uneven work)."""
    cuda = use_cuda and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if launched_as_ranks() and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    return device


def leave() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank tears down together: one that left early aborted the other at exit
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def agree(error: BaseException | None) -> None:
    """Collective: every rank calls it with its own outcome, and every rank raises when any
    rank failed (its own error; else one naming the first rank that failed and why: a
    ``ValueError`` when that rank's was one, bad input rather than a bug), so no rank waits
    forever for one that is gone."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    outcomes: list[tuple[bool, str] | None] = [None] * dist.get_world_size()
    mine = None if error is None else (isinstance(error, ValueError), f"{type(error).__name__}: {error}")
    dist.all_gather_object(outcomes, mine)
    if error is not None:
        raise error
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if failed:
        rank, (bad_input, message) = failed[0]
        raise (ValueError if bad_input else RuntimeError)(f"rank {rank} failed, so this rank stops too: {message}")
