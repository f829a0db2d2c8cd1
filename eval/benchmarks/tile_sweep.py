"""Tile grid of the packed search kernel on the GPU, for chosen ``N x K x D`` cases.

For each case every layout of the norm columns that applies (a second dot, the norms as the
dot's initial accumulator, a row padded to twice the width) is launched with every tile of a
grid (``BLOCK_N``, ``BLOCK_K``, warps, pipeline stages, half-tile dots for narrow rows) and
each codebook split asked for, without the autotuner. Reported per launch: the median ms of the
call replayed from a CUDA graph (the kernels alone), and how many indices differ from the
tiled kernel's. The autotuned default is timed beside them. This is what the packed kernel's
tile set and :class:`~tokenizers_vq.kernels.plan.SearchPlan` choices are read from.

Triton compiles each variant once, on the CPU: ``--workers`` processes compile the grid first
(the Triton cache is shared), then one process times it, so compiling does not take the GPU
time the timings need. Writes ``tiles.json`` (every row) and ``tiles.md`` (the best launches
per case) under ``--out`` as rows land.

    python -m tokenizers_vq.eval.benchmarks.tile_sweep --out DIR --workers 16 --budget 300
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import time
from pathlib import Path
from types import MappingProxyType

import torch

from tokenizers_vq.kernels.plan import DEFAULT_PLAN

CASES = "32768x1024x256,32768x16384x256,32768x100000x256,32768x16384x32,262144x16384x32"
SMEM = 224 * 1024


def layouts(d: int) -> dict:
    """Plans with each layout of the norm columns that differs at this ``d`` (bf16)."""
    no_pad = MappingProxyType({torch.bfloat16: 0})
    out = {"ext": DEFAULT_PLAN.replace(pad_up_max_d=no_pad, norm_init_min_block_d=2**30),
           "norminit": DEFAULT_PLAN.replace(pad_up_max_d=no_pad, norm_init_min_block_d=0, norm_init_max_aug_bytes=2**62)}
    if d <= 128:
        out["padup"] = DEFAULT_PLAN.replace(pad_up_max_d=MappingProxyType({torch.bfloat16: 2**30}))
    return out


def _warps(elements: int) -> tuple[int, ...]:
    """Warps tried for a narrow-row tile of ``elements``: 4 below 128 x 128, 8 above, both at it."""
    return (4,) if elements < 128 * 128 else (8,) if elements > 128 * 128 else (4, 8)


def tiles(width: int) -> list[dict]:
    """The grid for rows ``width`` columns wide (``BLOCK_D + EXT``), pruned to what fits in shared memory."""
    out = []
    if width > 128:
        grid = itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3, 4), (False,))
    else:
        grid = ((bn, bk, w, st, half)
                for bn, bk, st, half in itertools.product((64, 128, 256), (64, 128, 256), (2, 3, 4), (False, True))
                for w in _warps(bn * bk))
    for bn, bk, w, st, half in grid:
        if (bn + bk * st) * width * 2 <= SMEM:
            out.append({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st, "HALF": half})
    return out


def tasks(cases: list[tuple[int, int, int]], splits: dict[tuple, tuple]) -> list[tuple]:
    """``(case, layout name, split, tile)`` for every launch of the sweep; ``tile`` None: autotuned."""
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415

    out = []
    for case in cases:
        d = case[2]
        for name, p in layouts(d).items():
            block_d, ext = packed_launch.layout(torch.bfloat16, d, p)
            if name == "norminit" and ext == 0:
                continue  # spare columns: no norm-init variant
            width = block_d + (0 if name == "norminit" else ext)
            for split in splits.get(case, (None,)):
                out.append((case, name, split, None))
                out.extend((case, name, split, t) for t in tiles(width))
    return out


def _inputs(case):
    n, k, d = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, n, d, device="cuda", generator=gen).bfloat16()
    c = torch.randn(1, k, d, device="cuda", generator=gen).bfloat16()
    return x, c


def _call(x, c, name, split, tile):
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415

    p = layouts(x.shape[-1])[name]
    return lambda: packed_launch.nearest_packed(x, c, True, split, tile=tile, plan=p)


def _compile(job: tuple) -> None:
    """Worker: compile (and run once) every launch in ``job``'s share of the tasks."""
    share, count, cases, splits = job
    inputs = {}
    for i, (case, name, split, tile) in enumerate(tasks(cases, splits)):
        if i % count != share or tile is None:
            continue
        if case not in inputs:
            inputs = {case: _inputs(case)}
        try:
            _call(*inputs[case], name, split, tile)()
        except Exception:  # noqa: BLE001  (recorded when timed)
            pass
    torch.cuda.synchronize()


def _time(fn, rep: int) -> float:
    import triton  # noqa: PLC0415

    from tokenizers_vq.eval.benchmarks.peers import graph  # noqa: PLC0415

    return triton.testing.do_bench(graph(fn), warmup=10, rep=rep, return_mode="median")


def _table(rows: list, top: int) -> str:
    lines = ["| N x K x D | layout | split | tile (BN x BK, warps, stages, half) | graph ms | vs autotuned | idx differ |",
             "|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys((r["n"], r["k"], r["d"]) for r in rows):
        mine = [r for r in rows if (r["n"], r["k"], r["d"]) == case and "ms" in r and r["ms"] == r["ms"]]  # timed
        auto = [r for r in mine if r["tile"] is None]
        ref = min((r["ms"] for r in auto), default=float("nan"))
        for r in auto + sorted((r for r in mine if r["tile"] is not None), key=lambda r: r["ms"])[:top]:
            t = r["tile"]
            desc = "autotuned" if t is None else \
                f"{t['BLOCK_N']}x{t['BLOCK_K']}, {t['num_warps']}, {t['num_stages']}{', half' if t['HALF'] else ''}"
            lines.append(f"| {case[0]} x {case[1]} x {case[2]} | {r['layout']} | {r['split'] or 'auto'} | {desc} | "
                         f"{r['ms']:.4f} | {ref / r['ms']:.2f}x | {r['differ']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results_tmp/tiles")
    ap.add_argument("--cases", default=CASES, help="comma-separated NxKxD")
    ap.add_argument("--splits", default="32768x1024x256=auto/2/4", help="CASE=auto/S/..., comma-separated")
    ap.add_argument("--workers", type=int, default=16, help="compiling processes")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the timing phase")
    ap.add_argument("--top", type=int, default=8, help="fastest launches per case in tiles.md")
    args = ap.parse_args()
    cases = [tuple(int(v) for v in s.split("x")) for s in args.cases.split(",") if s]
    splits = {}
    for item in filter(None, args.splits.split(",")):
        case, values = item.split("=")
        splits[tuple(int(v) for v in case.split("x"))] = tuple(None if v == "auto" else int(v) for v in values.split("/"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_tasks = tasks(cases, splits)
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        pool.map(_compile, [(i, args.workers, cases, splits) for i in range(args.workers)])
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "launches": len(all_tasks), "compile_s": round(time.time() - t0, 1)}
    print(json.dumps(meta), flush=True)
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    rows, t1, inputs, ref = [], time.time(), None, None
    for case, name, split, tile in all_tasks:
        if time.time() - t1 > args.budget:
            meta["stopped"] = f"budget of {args.budget:.0f} s spent"
            break
        if inputs is None or inputs[0] != case:
            inputs = (case, _inputs(case))
            ref = nearest_codes_triton(inputs[1][0][0], inputs[1][1][0], algorithm="tiled")[1]
        x, c = inputs[1]
        row = {"n": case[0], "k": case[1], "d": case[2], "layout": name, "split": split, "tile": tile}
        try:
            fn = _call(x, c, name, split, tile)
            row["differ"] = int((fn()[1][0] != ref).sum())
            row["ms"] = _time(fn, 50 if case[0] * case[1] < 10**9 else 100)
        except Exception as e:  # noqa: BLE001  (a tile that does not compile or launch)
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if len(rows) % 20 == 0:
            (out / "tiles.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    (out / "tiles.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    (out / "tiles.md").write_text(f"# Packed-kernel tiles: {meta['device']}, {meta['date']}\n\n"
                                  f"`python -m tokenizers_vq.eval.benchmarks.tile_sweep` ({len(rows)} of "
                                  f"{len(all_tasks)} launches timed).\n\n" + _table(rows, args.top))


if __name__ == "__main__":
    main()
