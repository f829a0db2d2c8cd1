"""Launch settings of the per-code statistics' segment sum (``kernels/segment.py``) on the GPU:
for each ``N x K x d`` case and a uniform and a skewed draw of codes, every setting of rows per
tile, columns per tile, parts per segment and warps, timed from a CUDA graph (no host time), its
sums checked against an fp64 reference; beside them the sort that orders the rows, the settings
the library picks today and ``index_add_`` (atomic adds: not reproducible, shown as a yardstick).

    python eval/gpu/segment_sweep.py [--cases 32768x1024x256,32768x16384x8,32768x16384x256] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _code_block_kernel(X, ORDER, SORTED, START, SUMS, K, D, sxn, sxd,
                       BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """A candidate: grid ``(cdiv(K, BLOCK_K), column blocks)``; one program sums the rows of
    ``BLOCK_K`` consecutive codes (one contiguous run of the sorted rows), each tile of rows added
    to its codes by a one-hot product in exact fp32 (``input_precision="ieee"``)."""
    k0 = tl.program_id(0) * BLOCK_K
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    kk = k0 + tl.arange(0, BLOCK_K)
    lo = tl.load(START + k0)
    hi = tl.load(START + tl.minimum(k0 + BLOCK_K, K))
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    rr = tl.arange(0, BLOCK_R)
    for r0 in range(lo, hi, BLOCK_R):
        rm = r0 + rr < hi
        rows = tl.load(ORDER + r0 + rr, mask=rm, other=0)
        code = tl.load(SORTED + r0 + rr, mask=rm, other=-1).to(tl.int32)
        xv = tl.load(X + rows[:, None] * sxn + dd[None, :] * sxd, mask=rm[:, None] & (dd < D)[None, :], other=0.0)
        onehot = (code[None, :] == kk[:, None]).to(tl.float32)
        acc += tl.dot(onehot, xv, input_precision="ieee")
    tl.store(SUMS + kk.to(tl.int64)[:, None] * D + dd[None, :], acc, mask=(kk < K)[:, None] & (dd < D)[None, :])


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
    from tokenizers_vq.kernels import relaunch, segment  # noqa: PLC0415
    from tokenizers_vq.kernels._host import cdiv, next_pow2  # noqa: PLC0415

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
    settings = {(min(block_d, next_pow2(d)), block_r, splits, warps) for block_d, block_r, splits, warps
                in itertools.product((32, 64, 128, 256), (2, 4, 8, 16, 32), (1, 2, 8), (2, 4, 8))}
    for block_d, block_r, splits, warps in sorted(settings):
        if block_r * block_d > 8192:
            continue
        parts = sums if splits == 1 else torch.empty(splits, k, d, device="cuda")

        def run(parts=parts, block_d=block_d, block_r=block_r, splits=splits, warps=warps):
            relaunch.launch(segment._segment_sum_kernel, (k, cdiv(d, block_d), splits), x, order, start, parts, counts, k, d,
                            *x.stride(), splits, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
            if splits > 1:
                torch.sum(parts, dim=0, out=sums)

        add("segment sum", run, sums, block_d=block_d, block_r=block_r, splits=splits, warps=warps)
    candidates = {(block_k, block_r, max(16, min(block_d, next_pow2(d))), warps) for block_k, block_r, block_d, warps
                  in itertools.product((16, 32, 64), (16, 32, 64), (16, 64, 128, 256), (4, 8))}
    for block_k, block_r, block_d, warps in sorted(candidates):
        if block_k * block_d > 16384:
            continue

        def run_blocks(block_k=block_k, block_r=block_r, block_d=block_d, warps=warps):
            relaunch.launch(_code_block_kernel, (cdiv(k, block_k), cdiv(d, block_d)), x, order, sorted_idx, start, sums,
                            k, d, *x.stride(), BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)

        add("code blocks (one-hot, ieee)", run_blocks, sums, block_k=block_k, block_r=block_r, block_d=block_d,
            warps=warps)
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
            best = [r for what in ("segment sum", "code blocks (one-hot, ieee)")
                    for r in sorted((r for r in done if r["what"] == what), key=lambda r: r["ms"])[:6]]
            for r in best + [r for r in done if r["what"] not in ("segment sum", "code blocks (one-hot, ieee)")]:
                print(f"  {r['ms']:.4f} ms  {r['what']}  " + " ".join(f"{key}={r[key]}" for key in
                                                                   ("block_k", "block_d", "block_r", "splits", "warps",
                                                                    "max_rel_err")
                                                                   if key in r), flush=True)


if __name__ == "__main__":
    main()
