"""One rank of the sharded-search test (run by tests/test_distributed.py): writes the
sharded search's indices for its queries and the unsharded reference's."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from tokenizers_vq.distributed import leave
from tokenizers_vq.quantizers._functional import nearest_codes_reference
from tokenizers_vq.quantizers.sharded import ShardedVectorQuantizer, shard_bounds, sharded_nearest_codes


def batches(rank: int, steps: int = 12) -> list[torch.Tensor]:
    """Rank ``rank``'s training batches (different data per rank; rank 1's batches hold
    fewer items than rank 0's in every other step, as an epoch's last batch does)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(3 - (rank * step % 2), 40, 8, generator=gen) * (1 + rank) for step in range(steps)]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    codebook = torch.randn(1001, 8)  # odd size: uneven shards
    codebook[700] = codebook[3]  # an exact tie across shards: the lower id must win
    torch.manual_seed(10 + rank)
    x = torch.randn(257 - 60 * rank, 8)  # unequal query counts
    x[0] = codebook[3]
    offset, count = shard_bounds(len(codebook), rank, world)
    out = {}
    for metric in ("l2", "cosine"):
        _, idx = sharded_nearest_codes(x, codebook[offset : offset + count], offset, metric)
        _, ref = nearest_codes_reference(x, codebook, metric)
        out[f"{metric}_sharded"], out[f"{metric}_reference"] = idx, ref
    vq = ShardedVectorQuantizer(8, 301, dead_code_threshold=0.95)
    for x in batches(rank):
        out["train_codes"] = vq(x).codes
    out["shard"], out["cluster_size"], out["restarts"] = vq.embed, vq.cluster_size, vq.restarts
    vq.eval()
    probe = torch.randn(2 + rank, 16, 8, generator=torch.Generator().manual_seed(7 + rank))
    out["probe_codes"], out["probe_decoded"] = vq.encode(probe), vq.decode(vq.encode(probe))
    save_file(out, f"{out_dir}/sharded_rank{rank}.safetensors")
    leave()  # a barrier first: a rank that tore down alone sometimes aborted the other at exit


if __name__ == "__main__":
    main(sys.argv[1])
    # gloo's threads can still abort the interpreter's teardown ("terminate called without
    # an active exception", rc -6) after a complete run; the results are on disk by now
    sys.stdout.flush()
    os._exit(0)
