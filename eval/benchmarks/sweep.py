"""Tuning sweep on the GPU, one call: what the benchmark's defaults are chosen from.

1. The packed kernel with the norm columns in a second dot (``EXT > 0``) against the tiled kernel, bf16
   and fp32-tf32, over ``d`` where the padded row has no six spare columns: sets
   ``SearchPlan.ext_max_d``.
2. Host overhead: the full call through the registered op, the direct eager call, and
   the same call replayed from a CUDA graph (GPU time only).
3. the tiled kernel tile configurations for large ``d`` (64- or 128-wide chunks), launched directly
   without the autotuner: sets the large-``d`` entries of ``tiled._configs``.
4. ``wide``: bf16 rows of 129-256 values in the packed kernel (x kept in registers) against
   the tiled kernel, and each wide-row tile: sets ``SearchPlan.max_row_bytes`` and the wide configs.
5. ``norminit``: rows without six spare columns, the norms in a second dot against the
   norms as the dot's initial accumulator: sets ``SearchPlan.norm_init_min_block_d``.
6. ``hostparts``: small calls, the split choice and the host time of each piece;
   ``profile``: cProfile of small calls (``host_cost.profile_gpu_calls``).
7. ``rowreduce``: the tiled kernel with each tile reduced to its rows at once, against the per-element
   walk: sets ``SearchPlan.row_reduce_min_d``.
8. ``splitone``: the packed kernel with the automatic split against one split.
9. ``padup``: rows without spare columns, a second dot against one dot twice as wide.
10. ``half``: the packed epilogue with one inline-PTX ``lop3`` per distance, and two half-tile
    dots folded by a 3-input min, per tile: sets ``SearchPlan.use_asm`` and the ``HALF`` configs.
    ``padup_half``: the same with d 27-32 and 59-64 padded to one dot twice as wide;
    ``norminit_half``: with their norms as the dot's initial accumulator.

Writes ``sweep.json`` and ``sweep.md`` under ``--out``; every row is printed as it lands.

    python -m tokenizers_vq.eval.benchmarks.sweep --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import MappingProxyType

import torch

from tokenizers_vq.kernels.plan import DEFAULT_PLAN


def bench(fn) -> float:
    import triton  # noqa: PLC0415

    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001  (a config that does not compile or fit: recorded)
        print("  failed:", type(e).__name__, str(e)[:160], flush=True)
        return float("nan")


def graph_ms(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (no host work in the timing)."""
    import triton  # noqa: PLC0415

    from tokenizers_vq.eval.benchmarks.peers import graph  # noqa: PLC0415

    return triton.testing.do_bench(graph(fn), warmup=25, rep=100, return_mode="median")


plan = DEFAULT_PLAN.replace  # plan(**changes): the default search plan with changes


def packed_vs_tiled(rows: list, n: int = 32768) -> None:
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    every = plan(ext_max_d=MappingProxyType({torch.bfloat16: 128, torch.float32: 64}))  # every one-chunk d
    for k in (100000, 16384):
        for dt, ds in ((torch.bfloat16, (16, 32, 64, 128)), (torch.float32, (16, 32, 64))):
            for d in ds:
                x = torch.randn(n, d, device="cuda").to(dt)
                c = torch.randn(k, d, device="cuda").to(dt)
                lay = packed_launch.layout(dt, d, every)
                tiled = bench(lambda: nearest_codes_triton(x, c, algorithm="tiled"))
                pk = bench(lambda: nearest_codes_triton(x, c, algorithm="packed", plan=every))
                row = {"part": "ext", "n": n, "k": k, "d": d, "dtype": str(dt).split(".")[1], "layout": lay,
                       "tiled_ms": tiled, "packed_ms": pk}
                rows.append(row)
                print(json.dumps(row), flush=True)


def host_us(fn, reps: int = 300) -> float:
    """Host microseconds per call of ``fn``, issued without synchronising (the launch
    queue absorbs them), after one warm call."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    us = (time.perf_counter() - t) / reps * 1e6
    torch.cuda.synchronize()
    return us


def host_overhead(rows: list) -> None:
    from tokenizers_vq.kernels.nearest import _nearest_impl, _nearest_op, nearest_codes_triton  # noqa: PLC0415

    for n, k, d in ((32768, 16384, 8), (32768, 100000, 8), (32768, 16384, 32)):
        x = torch.randn(n, d, device="cuda").bfloat16()
        c = torch.randn(k, d, device="cuda").bfloat16()
        for alg in ("tiled", "packed"):
            row = {"part": "host", "n": n, "k": k, "d": d, "algorithm": alg,
                   "public_ms": bench(lambda: nearest_codes_triton(x, c, algorithm=alg)),
                   "op_ms": bench(lambda: _nearest_op(x, c, "l2", 0, "tf32", True, 0, alg)),
                   "direct_ms": bench(lambda: _nearest_impl(x, c, "l2", 0, "tf32", True, 0, alg)),
                   "graph_ms": graph_ms(lambda: _nearest_impl(x, c, "l2", 0, "tf32", True, 0, alg))}
            row["host_us_per_call"] = host_us(lambda: _nearest_impl(x, c, "l2", 0, "tf32", True, 0, alg), reps=200)
            rows.append(row)
            print(json.dumps(row), flush=True)


def tiled_configs(rows: list, n: int = 32768) -> None:
    import triton  # noqa: PLC0415

    from tokenizers_vq.kernels import nearest as nr  # noqa: PLC0415
    from tokenizers_vq.kernels import tiled, tiles as tl_host  # noqa: PLC0415

    tiles = [(128, 128, 8, 4), (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 64, 4, 4),
             (128, 128, 4, 4), (128, 128, 8, 5), (256, 128, 8, 4)]
    for k, d in ((16384, 256), (16384, 1536)):
        x = torch.randn(1, n, d, device="cuda").bfloat16()
        c = torch.randn(1, k, d, device="cuda").bfloat16()
        bias, scale = tl_host.codeword_terms(c, False)
        dist = torch.empty(1, n, device="cuda")
        idx = torch.empty(1, n, device="cuda", dtype=torch.int64)
        auto = bench(lambda: nr.nearest_codes_triton(x[0], c[0], algorithm="tiled"))
        print(json.dumps({"part": "tiledcfg", "k": k, "d": d, "autotuned_public_ms": auto}), flush=True)
        rows.append({"part": "tiledcfg", "n": n, "k": k, "d": d, "config": "autotuned (public call)", "ms": auto})
        for bd in (64, 128):
            for bn, bk, w, st in tiles:
                if (bn + bk * st) * bd * 2 > 220 * 1024:
                    continue

                def run(bn=bn, bk=bk, w=w, st=st, bd=bd):
                    grid = (triton.cdiv(n, bn), 1, 1)
                    tiled._nearest_kernel.fn[grid](x, c, bias, scale, dist, idx, dist, n, k, d, k, *x.stride(), *c.stride(),
                                                n, 0, COSINE=False, PRECISION="tf32", SPLIT=False, WRITE_DIST=True,
                                                ONE_CHUNK=False, BLOCK_D=bd, DOT_F32=False, BLOCK_N=bn, BLOCK_K=bk,
                                                num_warps=w, num_stages=st)

                ms = bench(run)
                row = {"part": "tiledcfg", "n": n, "k": k, "d": d, "config": [bn, bk, w, st, bd], "ms": ms,
                       "tflops": 2 * n * k * d / ms / 1e9 if ms == ms else None}
                rows.append(row)
                print(json.dumps(row), flush=True)


def wide_rows(rows: list, n: int = 32768) -> None:
    """bf16 d 129-256 (BLOCK_D 256): the packed kernel (x kept in registers, d = 256 with a
    second dot) against the tiled kernel, autotuned, and each wide-row tile launched directly."""
    from tokenizers_vq.kernels import packed, packed_launch  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    for k, d in ((16384, 256), (100000, 256), (16384, 192), (16384, 160)):
        x = torch.randn(n, d, device="cuda").bfloat16()
        c = torch.randn(k, d, device="cuda").bfloat16()
        row = {"part": "wide", "n": n, "k": k, "d": d, "layout": packed_launch.layout(torch.bfloat16, d),
               "tiled_ms": bench(lambda: nearest_codes_triton(x, c, algorithm="tiled")),
               "packed_ms": bench(lambda: nearest_codes_triton(x, c, algorithm="packed")),
               "ran_packed": packed_launch.applies(torch.bfloat16, d, "l2", "tf32", 1, k)}
        if d == 256:
            xg, cg = x[None], c[None]
            for cfg in packed._configs()[packed.WIDE_CONFIGS:]:
                tile = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                key = f"{tile['BLOCK_N']}x{tile['BLOCK_K']}w{tile['num_warps']}s{tile['num_stages']}"
                row[key] = bench(lambda tile=tile: packed_launch.nearest_packed(xg, cg, True, None, tile=tile))
        rows.append(row)
        print(json.dumps(row), flush=True)


def norm_init(rows: list) -> None:
    """Rows without six spare columns: the norms in a second 16-wide dot (default) against
    the norms as the dot's initial accumulator (``SearchPlan.norm_init_min_block_d``), public calls."""
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    for n, k, d, dt in ((32768, 16384, 256, torch.bfloat16), (32768, 100000, 256, torch.bfloat16),
                        (32768, 16384, 128, torch.bfloat16), (32768, 16384, 32, torch.bfloat16),
                        (262144, 16384, 32, torch.bfloat16), (32768, 100000, 32, torch.bfloat16),
                        (32768, 16384, 32, torch.float32), (32768, 100000, 16, torch.bfloat16)):
        x = torch.randn(n, d, device="cuda").to(dt)
        c = torch.randn(k, d, device="cuda").to(dt)
        row = {"part": "norminit", "n": n, "k": k, "d": d, "dtype": str(dt).split(".")[1]}
        for flag in (False, True, False, True):  # twice each, interleaved: run-to-run noise shows
            p = plan(norm_init_min_block_d=0 if flag else 2**30)
            row.setdefault(f"norm_init{int(flag)}_ms", []).append(bench(lambda p=p: nearest_codes_triton(x, c, plan=p)))
        rows.append(row)
        print(json.dumps(row), flush=True)


def row_reduce(rows: list, n: int = 32768) -> None:
    """Wide bf16 rows: the tiled kernel with the per-element walk against ``ROW_REDUCE`` (autotuned,
    public calls, automatic split and one split): sets ``SearchPlan.row_reduce_min_d``. (A chunked-GEMM
    path, the vendor GEMM into a reused 56 MiB fp32 block folded by a Triton pass, lost to
    it at every d.)"""
    from tokenizers_vq.kernels import nearest as nr  # noqa: PLC0415

    for k, d in ((16384, 1536), (16384, 1024), (16384, 768), (16384, 512)):
        x = torch.randn(1, n, d, device="cuda").bfloat16()
        c = torch.randn(1, k, d, device="cuda").bfloat16()
        row = {"part": "rowreduce", "n": n, "k": k, "d": d}
        for flag in (False, True):
            p = plan(row_reduce_min_d=0 if flag else 2**30)
            for split in (None, 1):
                row[f"tiled_rr{int(flag)}_split{split or 'auto'}_ms"] = bench(
                    lambda split=split, p=p: nr.nearest_codes_triton(x[0], c[0], algorithm="tiled", split_k=split, plan=p))
        rows.append(row)
        print(json.dumps(row), flush=True)


def split_one(rows: list) -> None:
    """The packed kernel at the benchmark's sizes, automatic split (more programs while
    the row blocks fill fewer than ``unsplit_waves`` waves: 2 when this part ran, 1 since)
    against one split: call and CUDA-graph ms."""
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    for n, k, d in ((32768, 16384, 8), (32768, 16384, 32), (32768, 100000, 8), (32768, 16384, 256),
                    (32768, 100000, 256), (262144, 16384, 32)):
        x = torch.randn(1, n, d, device="cuda").bfloat16()
        c = torch.randn(1, k, d, device="cuda").bfloat16()
        row = {"part": "splitone", "n": n, "k": k, "d": d}
        for split in (None, 1):
            row[f"split{split or 'auto'}_ms"] = bench(lambda split=split: nearest_codes_triton(x[0], c[0], split_k=split))
            row[f"split{split or 'auto'}_graph_ms"] = graph_ms(lambda split=split: packed_launch.nearest_packed(x, c, True, split))
        rows.append(row)
        print(json.dumps(row), flush=True)


def pad_up(rows: list) -> None:
    """Rows without six spare columns (d 11-16, 27-32): the norms in a second 16-wide dot
    (default) against one dot over a row padded to twice the width (``SearchPlan.pad_up_max_d``)."""
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    for n, k, d in ((262144, 16384, 32), (32768, 16384, 32), (32768, 100000, 32), (262144, 16384, 16),
                    (32768, 100000, 16)):
        x = torch.randn(n, d, device="cuda").bfloat16()
        c = torch.randn(k, d, device="cuda").bfloat16()
        row = {"part": "padup", "n": n, "k": k, "d": d}
        for flag in (False, True, False, True):  # twice each, interleaved
            p = plan(pad_up_max_d=MappingProxyType({torch.bfloat16: 2**30 if flag else 0}))
            row.setdefault(f"padup{int(flag)}_ms", []).append(bench(lambda p=p: nearest_codes_triton(x, c, plan=p)))
            row[f"padup{int(flag)}_layout"] = packed_launch.layout(torch.bfloat16, d, p)
        rows.append(row)
        print(json.dumps(row), flush=True)


HALF_TILES = [(128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (64, 256, 8, 3), (64, 128, 4, 3), (128, 128, 8, 4),
              (128, 128, 8, 2), (64, 256, 4, 3), (256, 64, 8, 3), (128, 64, 4, 3), (128, 256, 8, 4), (128, 256, 8, 2),
              (64, 128, 4, 4), (64, 256, 4, 4)]
HALF_WIDE_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (64, 128, 4, 3)]


def half_tiles(rows: list, cases=None, pad_up: bool | None = None, part: str = "half", norm_init: bool = False) -> None:
    """The packed kernel's epilogue: the autotuned default with the compiler's LOP3s
    (``SearchPlan.use_asm`` off) and with one inline-PTX ``lop3`` per distance; then each tile with
    one dot per tile against two half-tile dots whose keys fold in one 3-input min
    (``HALF``). Public calls, plus CUDA-graph time where the host may bind; every variant's
    indices are compared with the tiled kernel's."""
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    cases = cases or ((262144, 16384, 32), (32768, 16384, 32), (32768, 100000, 8), (262144, 16384, 8),
                      (32768, 16384, 8), (32768, 100000, 32), (262144, 16384, 16), (32768, 16384, 64),
                      (32768, 16384, 128), (32768, 16384, 256))
    base = plan()
    if pad_up is not None:
        base = plan(pad_up_max_d=MappingProxyType({torch.bfloat16: 2**30 if pad_up else 0}))
    if norm_init:
        base = base.replace(norm_init_min_block_d=0)
    for n, k, d in cases:
        x = torch.randn(n, d, device="cuda").bfloat16()
        c = torch.randn(k, d, device="cuda").bfloat16()
        ref = nearest_codes_triton(x, c, algorithm="tiled")[1]
        row = {"part": part, "n": n, "k": k, "d": d, "layout": packed_launch.layout(torch.bfloat16, d, base),
               "norm_init": norm_init}
        host_bound = n * k < 10**9

        def measure(tag, p):
            row[f"{tag}_ms"] = bench(lambda: nearest_codes_triton(x, c, plan=p))
            if host_bound:
                row[f"{tag}_graph_ms"] = graph_ms(lambda: packed_launch.nearest_packed(x[None], c[None], True, None, plan=p))
            try:
                row[f"{tag}_differ"] = int((nearest_codes_triton(x, c, plan=p)[1] != ref).sum())
            except Exception as e:  # noqa: BLE001
                row[f"{tag}_differ"] = type(e).__name__

        for asm in (False, True):
            measure(f"auto_asm{int(asm)}", base.replace(use_asm=asm))
        for bn, bk, w, st in HALF_WIDE_TILES if d > 128 else HALF_TILES:
            for half in (False, True):
                tile = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st, "HALF": half}
                measure(f"{bn}x{bk}w{w}s{st}{'h' if half else ''}", base.replace(force_tile=tile))
        rows.append(row)
        print(json.dumps(row), flush=True)


def pad_up_half(rows: list) -> None:
    """``half`` with rows of d 27-32 and 59-64 padded to twice the width (one dot, no second)."""
    half_tiles(rows, ((262144, 16384, 32), (32768, 16384, 32), (32768, 100000, 32), (32768, 16384, 64)), True,
               "padup_half")


def norm_init_half(rows: list) -> None:
    """``half`` with rows of d 27-32 and 59-64 taking the norms as the dot's initial
    accumulator (one fp32 add per distance, on the FMA pipe) instead of a second dot or a
    row twice as wide."""
    half_tiles(rows, ((262144, 16384, 32), (32768, 16384, 32), (32768, 100000, 32), (32768, 16384, 64)), False,
               "norminit_half", norm_init=True)


def host_parts(rows: list) -> None:
    """Small calls (32768 x 16384, d = 8 and 32, bf16): call and CUDA-graph time with the
    automatic split and with one split, and the host microseconds of each piece (issued
    without synchronising: the launch queue absorbs them)."""
    import triton  # noqa: PLC0415

    from tokenizers_vq.kernels import nearest as nr  # noqa: PLC0415
    from tokenizers_vq.kernels import packed, packed_launch  # noqa: PLC0415

    for n, k, d in ((32768, 16384, 8), (32768, 16384, 32)):
        x = torch.randn(1, n, d, device="cuda").bfloat16()
        c = torch.randn(1, k, d, device="cuda").bfloat16()
        row = {"part": "hostparts", "n": n, "k": k, "d": d}
        for split in (None, 1, 2):
            tag = "auto" if split is None else str(split)
            row[f"split_{tag}"] = {
                "public_ms": bench(lambda: nr.nearest_codes_triton(x[0], c[0], split_k=split)),
                "graph_ms": graph_ms(lambda: packed_launch.nearest_packed(x, c, True, split)),
                "public_host_us": host_us(lambda: nr.nearest_codes_triton(x[0], c[0], split_k=split)),
                "nearest_packed_host_us": host_us(lambda: packed_launch.nearest_packed(x, c, True, split))}
        block_d, ext = packed_launch.layout(torch.bfloat16, d)
        k_pad = triton.cdiv(k, 256) * 256
        c_aug = torch.empty(1, k_pad, block_d + ext, device="cuda", dtype=torch.bfloat16)
        dist = torch.empty(1, n, device="cuda")
        idx = torch.empty(1, n, device="cuda", dtype=torch.int64)
        row["augment_host_us"] = host_us(lambda: packed._augment_kernel[(k_pad // 64, 1)](
            c, c_aug, None, k, d, block_d if ext else d, *c.stride(), BLOCK_K=64, BLOCK_D=block_d, EXT=ext,
            NORM_INIT=False))
        meta = dict(SPLIT=False, WRITE_DIST=True, TILE_BITS=plan().tile_bits, BLOCK_D=block_d, EXT=ext, DOT_F32=False,
                    NORM_INIT=False, CSQ=None)
        args = (x, c, c_aug, dist, idx, n, k, k_pad, d, k_pad, *x.stride(), *c.stride(), n, 0)
        row["packed_autotuned_launch_host_us"] = host_us(
            lambda: packed._packed_kernel[lambda m: (triton.cdiv(n, m["BLOCK_N"]), 1, 1)](*args, **meta))
        tile = {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}
        row["packed_jit_launch_host_us"] = host_us(lambda: packed._packed_kernel.fn[(n // 128, 1, 1)](*args, **meta, **tile))
        row["empty3_host_us"] = host_us(lambda: (torch.empty(n, device="cuda"), torch.empty(n, device="cuda"),
                                                 torch.empty(k_pad, 48, device="cuda")))
        rows.append(row)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results_tmp/sweep")
    ap.add_argument("--parts", default="ext,host,tiledcfg")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list = []
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    from tokenizers_vq.eval.benchmarks.host_cost import profile_gpu_calls  # noqa: PLC0415

    parts = {"ext": packed_vs_tiled, "host": host_overhead, "tiledcfg": tiled_configs, "profile": profile_gpu_calls,
             "wide": wide_rows, "norminit": norm_init, "hostparts": host_parts,
             "rowreduce": row_reduce, "splitone": split_one, "padup": pad_up, "half": half_tiles,
             "padup_half": pad_up_half, "norminit_half": norm_init_half}
    try:
        for name in args.parts.split(","):
            parts[name](rows)
            (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    finally:
        (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
