"""Ways to draw the distinct random rows that dead-code restarts and k-means seeds take, timed on
the GPU: ``torch.randperm(n)`` (k-means seeds) against the order of ``n`` random fp32 keys
(``torch.rand(n).argsort()``), the ``k`` largest of them (``torch.topk``, for ``k`` codes), and
``distributed.spread_rows`` (the restarts' rows: one random offset and a fixed stride coprime with
``n``; the indices of ``k`` slots), at a few batch sizes. Per call: the GPU time of one call
replayed from a CUDA graph, and the host time of an eager call with the GPU kept busy.

    python eval/gpu/random_rows_ab.py [--rows 8192,32768,262144] [--codes 1024]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenizers_vq.distributed import spread_rows


def gpu_us(fn, reps: int = 200) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph (its kernels alone)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def host_us(fn, reps: int = 30) -> float:
    """Host microseconds per eager call, enqueued behind a GPU sleep (no call waits for the GPU; few
    enough calls that the launch queue does not fill)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t) / reps * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="8192,32768,262144")
    ap.add_argument("--codes", type=int, default=1024)
    args = ap.parse_args()
    rows = []
    for n in (int(v) for v in args.rows.split(",")):
        k = min(args.codes, n)
        ways = {"randperm": lambda n=n: torch.randperm(n, device="cuda"),
                "rand_argsort": lambda n=n: torch.rand(n, device="cuda").argsort(),
                "rand_topk": lambda n=n, k=k: torch.rand(n, device="cuda").topk(k, sorted=False).indices,
                "spread_rows": lambda n=n, slots=torch.arange(k, device="cuda"): spread_rows(n, slots)}
        for name, fn in ways.items():
            rows.append({"rows": n, "way": name, "gpu_us": round(gpu_us(fn), 1), "host_us": round(host_us(fn), 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
