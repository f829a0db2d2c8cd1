"""One rank of the distributed codebook test (run by tests/test_distributed.py).

Usage: RANK=r WORLD_SIZE=w MASTER_ADDR=... MASTER_PORT=... python dist_worker.py OUT_DIR
Each rank trains the same quantizers for 20 steps on different data and writes
its state dicts to OUT_DIR/{name}_rank{r}.safetensors.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from tokenizers_vq.distributed import leave
from tokenizers_vq import ResidualQuantizer, VectorQuantizer
from tokenizers_vq.quantizers import ProjectedCodebookVQ, shrink_codebook
from tokenizers_vq.train.losses import LeCam


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial codebooks everywhere
    models = {
        "vq": VectorQuantizer(8, 64, kmeans_init=True, kmeans_iters=5, dead_code_threshold=1.5),
        "rvq": ResidualQuantizer([VectorQuantizer(8, 32, kmeans_init=True, dead_code_threshold=1.5) for _ in range(2)]),
        "vq-cosine-learned": VectorQuantizer(8, 64, metric="cosine", learning="loss", dead_code_threshold=1.5),
        "vq-affine": VectorQuantizer(8, 64, learning="loss", affine=True, kmeans_init=True, dead_code_threshold=1.5),
    }
    lecam = LeCam(decay=0.9)
    torch.manual_seed(100 + rank)  # different data (and random streams) per rank
    for _ in range(20):
        x = torch.randn(4, 32, 8) * (1 + rank) + rank
        for m in models.values():
            m(x)
        lecam([x[..., :1]], [x[..., 1:2] - 1])  # a discriminator's outputs on real and fake, per rank
    models["lecam"] = lecam
    # a projected codebook initialised from latents whose row count differs per rank (crops
    # of per-rank sizes): every rank waits for the others before the collective k-means
    torch.manual_seed(0)
    projected = ProjectedCodebookVQ(8, 16, init_samples=64, init_batches=4).train()
    torch.manual_seed(200 + rank)
    for _ in range(12):
        projected(torch.randn(1, 20 if rank == 0 else 3, 8) + rank)
    models["projected-uneven"] = projected
    # features with more rows than codes are clustered as the layer is built, from each rank's own random state
    models["projected-features"] = ProjectedCodebookVQ(8, 16, features=torch.randn(40, 8, generator=torch.Generator().manual_seed(1)))
    if rank == 0:  # a codebook shrunk by one process of the group needs no other rank
        shrunk, _ = shrink_codebook(VectorQuantizer(8, 64), 16)
        models["shrunk"] = shrunk
    for name, m in models.items():
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{out_dir}/{name}_rank{rank}.safetensors")
    leave()  # a barrier first: a rank that tore down alone sometimes aborted the other at exit


if __name__ == "__main__":
    main(sys.argv[1])
    # gloo's threads can still abort the interpreter's teardown ("terminate called without
    # an active exception", rc -6) after a complete run; the results are on disk by now
    sys.stdout.flush()
    os._exit(0)
