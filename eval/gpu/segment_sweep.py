"""Launch settings of the per-code statistics' segment sums (``kernels/segment.py``) on the GPU:
for each ``N x K x d`` case and a uniform and a skewed draw of codes, every setting of sorted rows
per chunk, columns per block and warps of the two launches (the chunks' runs, then the pieces of
cut runs), timed from a CUDA graph (no host time), the sums checked against an fp64 reference;
beside them the sort that orders the rows, the library's whole call as it picks its settings, and
``index_add_`` (atomic adds: not reproducible, shown as a yardstick).

    python eval/gpu/segment_sweep.py [--cases 32768x1024x256,32768x16384x8,32768x16384x256] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch


def graph_ms(fn, calls: int = 10, rounds: int = 3) -> float:
    """Median ms of one call of ``fn``, ``calls`` of it captured in one CUDA graph."""
    from tokenizers_vq.eval.benchmarks.peers import graph  # noqa: PLC0415

    replay = graph(lambda: [fn() for _ in range(calls)])
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def codes(n: int, k: int, skewed: bool, gen: torch.Generator) -> torch.Tensor:
    """Uniform codes, or skewed ones (``floor(K u^4)``: about half the rows on the first 6% of codes)."""
    u = torch.rand(n, generator=gen, device="cuda")
    return (k * (u.pow(4) if skewed else u)).long().clamp_max(k - 1)


def sweep_case(n: int, k: int, d: int, skewed: bool) -> list[dict]:
    from tokenizers_vq.kernels import segment  # noqa: PLC0415
    from tokenizers_vq.kernels._host import next_pow2  # noqa: PLC0415

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen)
    idx = codes(n, k, skewed, gen)
    ref = torch.zeros(k, d, device="cuda", dtype=torch.float64).index_add_(0, idx, x.double())
    key = idx.to(torch.int16 if k < 32767 else torch.int32)
    sorted_idx, order = torch.sort(key, stable=True)
    start = torch.searchsorted(sorted_idx, torch.arange(k + 1, device="cuda", dtype=key.dtype))
    rows = []

    def add(name: str, fn, sums=None, **setting) -> None:
        try:
            ms = graph_ms(fn)
            err = float((sums - ref).abs().max() / ref.abs().max()) if sums is not None else None
            rows.append({"n": n, "k": k, "d": d, "codes": "skewed" if skewed else "uniform", "what": name,
                         **setting, "ms": ms, "max_rel_err": err})
        except Exception as e:  # noqa: BLE001  (a setting that does not compile or launch is recorded)
            rows.append({"n": n, "k": k, "d": d, "codes": "skewed" if skewed else "uniform", "what": name,
                         **setting, "ms": None, "error": f"{type(e).__name__}: {str(e)[:120]}"})

    add("sort + searchsorted", lambda: torch.searchsorted(torch.sort(key, stable=True)[0],
                                                          torch.arange(k + 1, device="cuda", dtype=key.dtype)))
    out = {}
    add("library (sort included)", lambda: out.__setitem__("s", segment._code_statistics(x, idx, k)[1]))
    rows[-1]["max_rel_err"] = float((out["s"] - ref).abs().max() / ref.abs().max())
    atomic = torch.zeros(k, d, device="cuda")
    add("index_add_ (atomic)", lambda: atomic.zero_().index_add_(0, idx, x), atomic)
    sums, counts = torch.empty(k, d, device="cuda"), torch.empty(k, device="cuda")
    settings = {(block_c, max(16, min(block_d, next_pow2(d))), warps) for block_c, block_d, warps
                in itertools.product((32, 64, 128, 256), (16, 32, 64, 128, 256), (2, 4, 8))}
    for block_c, block_d, warps in sorted(settings):
        if block_c * block_d > 16384:
            continue

        def run(block_c=block_c, block_d=block_d, warps=warps):
            segment.sum_runs(x, order, sorted_idx, start, sums, counts, block_c, block_d, warps)

        add("runs in chunks", run, sums, block_c=block_c, block_d=block_d, warps=warps)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="32768x1024x256,32768x16384x8,32768x16384x256")
    ap.add_argument("--out", type=Path, default=Path("results_tmp/segment_sweep"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        n, k, d = map(int, case.split("x"))
        for skewed in (False, True):
            rows += sweep_case(n, k, d, skewed)
            (args.out / "segment_sweep.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                     "rows": rows}, indent=1))
            done = [r for r in rows if r["n"] == n and r["k"] == k and r["d"] == d and r.get("ms") is not None
                    and r["codes"] == ("skewed" if skewed else "uniform")]
            print(f"## {case} {'skewed' if skewed else 'uniform'}")
            best = sorted((r for r in done if r["what"] == "runs in chunks"), key=lambda r: r["ms"])[:8]
            for r in best + [r for r in done if r["what"] != "runs in chunks"]:
                print(f"  {r['ms']:.4f} ms  {r['what']}  " + " ".join(f"{key}={r[key]}" for key in
                                                                   ("block_c", "block_d", "warps", "max_rel_err")
                                                                   if key in r), flush=True)


if __name__ == "__main__":
    main()
