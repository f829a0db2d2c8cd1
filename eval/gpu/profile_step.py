"""Where a training step's time goes on the GPU: ``tvq train``'s arguments, 10 warm-up
steps, 20 timed steps, then 10 steps under ``torch.profiler`` (top operators by GPU and
by CPU time).

    python eval/gpu/profile_step.py train/configs/audio.yaml --data.train=... --out_dir=runs/profile
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokenizers_vq.train.config import load_config
from tokenizers_vq.train.trainer import Trainer


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:] + ["--sample_every=0", "--log_every=1000000", "--max_minutes=0"])
    tr = Trainer(cfg)
    for label, steps in (("warm-up", 10), ("timed", 20)):
        cfg.steps = tr.step + steps
        torch.cuda.synchronize()
        t = time.perf_counter()
        tr.train()
        torch.cuda.synchronize()
        print(f"{label}: {(time.perf_counter() - t) / steps * 1e3:.1f} ms/step (the final checkpoint included)")
    cfg.steps = tr.step + 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tr.train()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
