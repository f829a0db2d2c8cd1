"""Host time of the small bf16 searches on a GPU, beside the benchmark's "eager - graph":
enqueue time per call (launches run ahead of the GPU, so this is the Python and launch
cost alone) and wall time per call of a stream of calls (the larger of host and GPU time).
    python eval/gpu/host_time.py [--cases 32768x1024x8,...] [--calls 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokenizers_vq.kernels.nearest import nearest_codes_triton


def measure(n: int, k: int, d: int, calls: int) -> dict:
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(k, d, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        nearest_codes_triton(x, c)
    enqueue, wall = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            nearest_codes_triton(x, c)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) / calls * 1e6)
        wall.append((t2 - t0) / calls * 1e6)
    return {"case": f"{n}x{k}x{d}", "enqueue_us": statistics.median(enqueue), "wall_us": statistics.median(wall)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="32768x1024x8,32768x4096x8,32768x4096x32")
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    for case in args.cases.split(","):
        print(json.dumps(measure(*map(int, case.split("x")), args.calls)))
