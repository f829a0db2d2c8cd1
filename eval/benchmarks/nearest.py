"""GPU benchmark of the fused nearest-code search against the peers.

One run checks and times everything: for each ``N x K x D`` case, our kernel as users
call it (bf16, fp32 with tf32 dot products, and exact fp32 for small ``D``: the packed
kernel where it applies, else the tiled kernel), the tiled kernel forced (``algorithm="tiled"``) beside it, against
``torch.cdist + argmin`` (fp32), ``addmm(|c|^2, x, C^T, alpha=-2) + argmin`` (fp32
and bf16), vector-quantize-pytorch's ``VectorQuantize`` (eval forward), flash-kmeans'
fused assign (fp16, norms precomputed) and FAISS GPU brute force where they import; our
bf16 call replayed from a CUDA graph shows what the kernels cost without the host. Then the
VQ-EMA training step (forward + backward + EMA update) of ours, eager and compiled with
``fullgraph=True``, against theirs and against the step's search alone
(:mod:`tokenizers_vq.eval.benchmarks.peers`).

Reported per method: median ms (``triton.testing.do_bench``; every method is timed in
``ROUNDS`` rounds over all methods and keeps its fastest round; vector-quantize-pytorch,
the slowest, once), extra peak memory
beyond inputs and outputs (``max_memory_allocated`` delta after a warm-up call, so
autotuning is excluded), and for ours the percent of the floor
``max(2 N K D / bf16 matmul rate, N K * 4 ops / CUDA-core op rate)``, both rates
measured or read on the device. Writes ``nearest.csv``, ``nearest.json`` and
``nearest.md`` under ``$OUT`` (or ``--out``) after every case; prints the table last.

    python -m tokenizers_vq.eval.benchmarks.nearest
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import time
from pathlib import Path

import torch

CASES = [(32768, 1024, 8), (32768, 1024, 256), (32768, 4096, 8), (32768, 4096, 32), (32768, 100000, 8), (262144, 262144, 8), (32768, 16384, 8), (32768, 16384, 32), (32768, 16384, 256),
         (32768, 16384, 1536), (32768, 100000, 256), (262144, 16384, 32)]
TRAIN_CASES = [(32768, 1024, 256), (32768, 16384, 8), (32768, 16384, 256)]
METHODS = ["ours_bf16", "ours_bf16_graph", "ours_bf16_tiled", "ours_fp32", "ours_fp32_tiled", "ours_fp32_exact",
           "cdist_fp32", "mm_fp32", "mm_bf16", "vqp", "flash_kmeans_fp16", "faiss_fp32"]
CHECKED = ["ours_bf16", "ours_fp32", "ours_bf16_tiled", "ours_fp32_tiled"]  # index checks, in this order
# Each method is timed in ROUNDS rounds over all methods and keeps its fastest median: a host-bound call
# (about 0.1 ms of GPU work under 0.1-0.4 ms of Python) was up to 4x slower in the first round after a
# peer's large run than in later ones (H100 bench), for ours and the peers alike.
ROUNDS = 2
EPILOGUE_OPS = 4  # per distance: score (1), compare (1), two selects (2)


def _kernels():
    """``tokenizers_vq.kernels.nearest`` (imported here: it needs Triton)."""
    from tokenizers_vq.kernels import nearest  # noqa: PLC0415

    return nearest


def measure(fn, skip_time: bool = False) -> dict:
    """Warm up (compiles, autotunes), then extra peak MiB of one call (beyond what it leaves
    allocated, its outputs), then median ms."""
    import triton  # noqa: PLC0415

    try:
        fn()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - base  # what the call left allocated: its outputs (not a buffer given to it)
        extra = torch.cuda.max_memory_allocated() - base - kept
        del out
        ms = math.nan if skip_time else triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return {"ms": ms, "extra_mib": extra / 2**20, "status": "ok"}
    except torch.OutOfMemoryError:
        return {"ms": math.nan, "extra_mib": math.nan, "status": "OOM"}
    except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
        return {"ms": math.nan, "extra_mib": math.nan, "status": f"error: {type(e).__name__}: {str(e)[:200]}"}
    finally:
        torch.cuda.empty_cache()


def device_rates() -> dict:
    """Measured bf16 matmul rate and the CUDA-core op rate (SMs x 128 lanes x max clock)."""
    import triton  # noqa: PLC0415

    props = torch.cuda.get_device_properties(0)
    clock_mhz = None
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.NVML_CLOCK_SM)
    except Exception:  # noqa: BLE001
        clock_mhz = getattr(props, "clock_rate", 1980000) / 1000
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    del a, b
    return {"device": props.name, "sms": props.multi_processor_count, "sm_clock_mhz": float(clock_mhz),
            "bf16_tflops": 2 * 8192**3 / ms / 1e9, "cuda_core_tops": props.multi_processor_count * 128 * clock_mhz / 1e6}


def floor_ms(n: int, k: int, d: int, rates: dict) -> tuple[float, float]:
    """``(floor, epilogue bound)`` in ms."""
    epi = n * k * EPILOGUE_OPS / (rates["cuda_core_tops"] * 1e12) * 1e3
    return max(2 * n * k * d / (rates["bf16_tflops"] * 1e12) * 1e3, epi), epi


def check(x, c, idx, u_in: float, tile_bits: int = 0) -> dict:
    """Rows whose index differs from the chunked fp32 torch reference, and how many of
    those are worse (in fp64) by more than the rounding bound of the search (plus, for
    the packed variant, its key truncation: ``2^-(23 - tile_bits)`` of the distance)."""
    from tokenizers_vq.quantizers._functional import nearest_codes_reference  # noqa: PLC0415

    _, ref = nearest_codes_reference(x, c)
    rows = (idx != ref).nonzero().squeeze(1)
    if rows.numel() == 0:
        return {"mismatch": 0, "bad": 0}
    xs = x[rows].double()
    d_ours = (xs - c[idx[rows]].double()).pow(2).sum(-1)
    d_ref = (xs - c[ref[rows]].double()).pow(2).sum(-1)
    c_max = c.float().norm(dim=-1).max().double()
    tol = 4 * (2 * u_in + (x.shape[1] + 4) * 2.0**-24) * (xs.norm(dim=-1) + c_max) ** 2
    if tile_bits:
        tol = tol + 2 * 2.0 ** -(23 - tile_bits) * (d_ref + tol)
    return {"mismatch": int(rows.numel()), "bad": int((d_ours - d_ref > tol).sum())}


def run_case(n: int, k: int, d: int, nearest, vqp_cls, deadline: float) -> dict:
    from tokenizers_vq.eval.benchmarks import peers  # noqa: PLC0415
    from tokenizers_vq.kernels import packed_launch, plan  # noqa: PLC0415  (after _kernels())

    x32 = torch.randn(n, d, device="cuda")
    c32 = torch.randn(k, d, device="cuda")
    xb, cb = x32.bfloat16(), c32.bfloat16()
    csq32 = c32.square().sum(1)
    csqb = csq32.bfloat16()
    fns = {
        "ours_bf16": lambda: nearest.nearest_codes_triton(xb, cb),
        "ours_bf16_tiled": lambda: nearest.nearest_codes_triton(xb, cb, algorithm="tiled"),
        "ours_fp32": lambda: nearest.nearest_codes_triton(x32, c32),
        "ours_fp32_tiled": lambda: nearest.nearest_codes_triton(x32, c32, algorithm="tiled"),
        "ours_fp32_exact": (lambda: nearest.nearest_codes_triton(x32, c32, precision="ieee")) if d <= 32 else None,
        "cdist_fp32": lambda: torch.cdist(x32, c32).argmin(1),
        "mm_fp32": lambda: torch.addmm(csq32, x32, c32.T, alpha=-2.0).argmin(1),
        "mm_bf16": lambda: torch.addmm(csqb, xb, cb.T, alpha=-2.0).argmin(1),
    }
    fk, fk_inputs, fk_status = peers.flash_kmeans(x32, c32)
    fa, fa_status = peers.faiss_flat(x32, c32)
    fns.update(flash_kmeans_fp16=fk, faiss_fp32=fa)
    try:
        res = {"ours_bf16_graph": measure(peers.graph(fns["ours_bf16"]))}
    except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
        res = {"ours_bf16_graph": {"status": f"error: {type(e).__name__}: {str(e)[:200]}"}}
    for rnd in range(ROUNDS):  # every method once per round; each keeps its fastest round (see module doc)
        for name, fn in fns.items():
            over = time.time() > deadline and not name.startswith("ours")
            if rnd == 0:
                absent = {"flash_kmeans_fp16": fk_status, "faiss_fp32": fa_status}.get(name, "skipped")
                res[name] = {"status": absent} if fn is None else {"status": "skipped"} if over else measure(fn)
            elif res[name].get("status") == "ok" and not over:
                again = measure(fn)
                if again["status"] == "ok":
                    res[name].setdefault("round_ms", [res[name]["ms"]]).append(again["ms"])
                    res[name]["ms"] = min(res[name]["round_ms"])
    checks = {}
    if time.time() < deadline:
        for name, (x, c, u_in) in zip(CHECKED, ((xb, cb, 0.0), (x32, c32, 2.0**-11)) * 2):
            if res[name]["status"] != "ok":
                continue
            algorithm = "tiled" if name.endswith("_tiled") else "auto"
            bits = plan.DEFAULT_PLAN.tile_bits if algorithm == "auto" and packed_launch.applies(x.dtype, d, "l2", "tf32", 1, k) else 0
            try:
                checks[name] = check(x, c, nearest.nearest_codes_triton(x, c, algorithm=algorithm)[1], u_in, bits)
            except Exception as e:  # noqa: BLE001  (OOM or a failing variant: recorded, the run goes on)
                checks[name] = {"mismatch": -1, "bad": -1, "status": f"{type(e).__name__}: {str(e)[:200]}"}
            torch.cuda.empty_cache()
        for name, run, (x, c) in (("flash_kmeans_fp16", fk, fk_inputs), ("faiss_fp32", fa, (x32, c32))):
            if res[name].get("status") == "ok":
                try:
                    idx = run()
                    idx = (idx[1] if isinstance(idx, tuple) else idx).reshape(-1).long()
                    checks[name] = check(x, c, idx, 0.0 if name.startswith("flash") else 2.0**-11)
                except Exception as e:  # noqa: BLE001  (as above)
                    checks[name] = {"mismatch": -1, "bad": -1, "status": f"{type(e).__name__}: {str(e)[:200]}"}
    if vqp_cls is None or time.time() > deadline:
        res["vqp"] = {"status": "skipped" if vqp_cls is not None else "not installed"}
    else:
        try:
            vq = vqp_cls(dim=d, codebook_size=k, decay=0.99).cuda().eval()
            x3 = x32[None]

            def vqp_fwd():
                with torch.no_grad():
                    return vq(x3)

            res["vqp"] = measure(vqp_fwd)
            del vq
        except torch.OutOfMemoryError:
            res["vqp"] = {"ms": math.nan, "extra_mib": math.nan, "status": "OOM"}
    kernel = {dt: "packed" if packed_launch.applies(t, d, "l2", "tf32", 1, k) else "tiled" for dt, t in (("bf16", torch.bfloat16),
                                                                                        ("fp32", torch.float32))}
    del x32, c32, xb, cb
    torch.cuda.empty_cache()
    return {"methods": res, "checks": checks, "kernel": kernel}


STEP_NAMES = ("ours", "ours_compiled", "ours_compiled_graphs", "ours_graphed", "ours_graph", "ours_unfused", "ours_unfused_compiled",
              "ours_unfused_graph", "search", "search_graph", "vqp", "vqp_compiled")
"""The training-step columns, in the table's order (``peers.train_steps``' names)."""


def vq_train_steps(vqp_cls, cases=TRAIN_CASES, deadline: float = math.inf, done=None) -> list[dict]:
    """Forward + backward + EMA update per ``N x K x D`` case: ours eager, compiled
    (``fullgraph=True``) and replayed from a CUDA graph, the step's search alone (called and
    replayed), vector-quantize-pytorch; cases after ``deadline`` are left out, and
    ``done(rows)`` is called after each case."""
    from tokenizers_vq.eval.benchmarks import peers  # noqa: PLC0415

    rows = []
    for n, k, d in cases:
        if time.time() > deadline:
            break
        torch._dynamo.reset()  # each case's compiled steps their own (past 8 recompiles a frame runs eager)
        steps = peers.train_steps(n, k, d, vqp_cls)
        rows.append({"n": n, "k": k, "d": d, **{name: measure(fn) for name, fn in steps.items()}})
        del steps
        torch.cuda.empty_cache()
        if done is not None:
            done(rows)
    return rows


def _cell(r: dict, memory: bool = True) -> str:
    if r.get("status") != "ok":
        return r.get("status", "-").split(":")[0]
    return f"{r['ms']:.3f} ({r['extra_mib']:.0f})" if memory else f"{r['ms']:.3f} (-)"


def _ms(r: dict) -> float:
    return r.get("ms", math.nan) if r.get("status") == "ok" else math.nan


def markdown(meta: dict, rows: list[dict], train: list[dict] | None) -> str:
    r = meta["rates"]
    names = {"ours_bf16": "ours bf16", "ours_bf16_graph": "ours bf16, CUDA graph", "ours_bf16_tiled": "tiled bf16",
             "ours_fp32": "ours fp32", "ours_fp32_tiled": "tiled fp32", "ours_fp32_exact": "ours fp32 exact",
             "cdist_fp32": "cdist fp32", "mm_fp32": "x@C^T fp32", "mm_bf16": "x@C^T bf16", "vqp": "vq-pytorch eval",
             "flash_kmeans_fp16": "flash-kmeans fp16", "faiss_fp32": "FAISS GPU flat fp32"}
    checked = CHECKED + ["flash_kmeans_fp16", "faiss_fp32"]
    lines = [f"# Nearest-code search: {r['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, vector-quantize-pytorch {meta['vqp']}, "
             f"flash-kmeans {meta.get('flash_kmeans', '-')}, faiss {meta.get('faiss', '-')}. "
             f"Measured bf16 matmul {r['bf16_tflops']:.0f} TFLOP/s (8192^3). Epilogue bound: {EPILOGUE_OPS} CUDA-core "
             f"ops per distance at {r['sms']} SMs x 128 lanes x {r['sm_clock_mhz']:.0f} MHz = "
             f"{r['cuda_core_tops']:.1f} Tops/s. Floor = max(2NKD / bf16 rate, that bound).", "",
             f"Median ms, the fastest of {ROUNDS} rounds over all methods (every round in the JSON, `round_ms`; "
             "vq-pytorch and the CUDA graph one round), "
             "and extra peak MiB beyond inputs and outputs. \"ours\" is the default eager call (the packed "
             "kernel where it applies, named in the kernel column, else the tiled kernel); \"CUDA graph\" replays that "
             "call with no host work (its memory is the graph's pool, allocated at capture: \"-\"); "
             "\"tiled\" forces `algorithm=\"tiled\"`; "
             "ours fp32 uses tf32 dot products, exact = `precision=\"ieee\"`; flash-kmeans gets fp16 inputs and "
             "both norms precomputed outside the timing. % floor and host us (eager - graph): ours bf16. "
             "Index checks against the fp32 torch argmin (mismatch, bad = worse than the rounding bound): "
             + " / ".join(names[n] for n in checked) + ".", "",
             "| N x K x D | " + " | ".join(names[k] for k in METHODS) + " | floor ms | % floor | host us | "
             "vs flash-kmeans | kernel bf16, fp32 | idx check (mismatch, bad) |",
             "|" + "---|" * (len(METHODS) + 7)]
    for row in rows:
        m = row["methods"]
        fl, _ = floor_ms(row["n"], row["k"], row["d"], r)
        ours, graph, fk = _ms(m["ours_bf16"]), _ms(m["ours_bf16_graph"]), _ms(m.get("flash_kmeans_fp16", {}))
        pct = f"{100 * fl / ours:.0f}%" if ours == ours else "-"
        host = f"{1000 * (ours - graph):.0f}" if ours == ours and graph == graph else "-"
        vs_fk = f"{fk / ours:.2f}x" if ours == ours and fk == fk else "-"
        chk = " / ".join(f"{c['mismatch']}, {c['bad']}" if (c := row["checks"].get(name)) else "-" for name in checked)
        cells = " | ".join(_cell(m.get(k, {}), k != "ours_bf16_graph") for k in METHODS)
        lines.append(f"| {row['n']} x {row['k']} x {row['d']} | " + cells
                     + f" | {fl:.3f} | {pct} | {host} | {vs_fk} | {', '.join(row.get('kernel', {}).values()) or '-'} | {chk} |")
    if train:
        lines += ["", "VQ-EMA training step (forward + backward + EMA update, fp32 latents; the backward from a fixed "
                  "gradient of the output and a unit one of each loss): ms (extra peak MiB). "
                  "\"compiled\": the quantizer under `torch.compile(fullgraph=True)`, \"compiled, CUDA graphs\" with "
                  "`mode=\"reduce-overhead\"`; \"graphed\": the quantizer through "
                  "`torch.cuda.make_graphed_callables` (its forward and backward replayed from CUDA graphs); \"graph\": the eager step "
                  "replayed from a CUDA graph (its kernels alone, no host time; its memory is the graph's pool, captured "
                  "before the peak is reset: \"-\"); \"search\": the step's search alone, "
                  "called and replayed. \"ours / search\": the fastest of eager, compiled, compiled with CUDA graphs and graphed over "
                  "the search call; "
                  "\"graph / search graph\": the same without the host. vq-pytorch eager and under `torch.compile` "
                  "(graph breaks allowed): \"torch update\" is our step (eager, compiled, graph) on the torch version "
                  "of the straight-through output, commitment loss and EMA update instead of the fused kernels; "
                  "\"vq-pytorch / ours eager\" is eager against eager, \"fastest\" the faster "
                  "of theirs against the fastest of ours. Our search runs in tf32 (the library's default for fp32 "
                  "latents), vq-pytorch's distances in exact fp32 (torch's default).", "",
                  "| N x K x D | ours | ours compiled | compiled, CUDA graphs | ours graphed | ours graph | torch update | torch update, "
                  "compiled | torch update, graph | search alone | search graph | "
                  "vq-pytorch | vq-pytorch compiled | ours / search | graph / search graph | vq-pytorch / ours eager | "
                  "vq-pytorch / ours, fastest | memory ours / theirs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in train:
            o, s_, v = (_ms(t.get(k, {})) for k in ("ours", "search", "vqp"))
            g, sg = _ms(t.get("ours_graph", {})), _ms(t.get("search_graph", {}))
            best = min((x for x in (o, *(_ms(t.get(k, {})) for k in ("ours_compiled", "ours_compiled_graphs", "ours_graphed")))
                        if x == x), default=math.nan)
            v_best = min((x for x in (v, _ms(t.get("vqp_compiled", {}))) if x == x), default=math.nan)
            mem = (f"{t['ours']['extra_mib'] / t['vqp']['extra_mib']:.3f}" if o == o and v == v
                   and t["vqp"]["extra_mib"] > 0 else "-")
            lines.append(f"| {t['n']} x {t['k']} x {t['d']} | " + " | ".join(_cell(t.get(k, {}), "graph" not in k) for k in STEP_NAMES)
                         + f" | {best / s_:.2f}x | {g / sg:.2f}x | {v / o:.1f}x | {v_best / best:.1f}x | {mem} |")
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict, rows: list[dict], train: list[dict] | None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "nearest.json").write_text(json.dumps({"meta": meta, "cases": rows, "train_step": train}, indent=1))
    with open(out / "nearest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["n", "k", "d", "method", "ms", "extra_mib", "status", "floor_ms", "epilogue_ms"])
        for row in rows:
            fl, epi = floor_ms(row["n"], row["k"], row["d"], meta["rates"])
            for name, r in row["methods"].items():
                w.writerow([row["n"], row["k"], row["d"], name, r.get("ms"), r.get("extra_mib"), r["status"], fl, epi])
        for t in train or []:
            for name in STEP_NAMES:
                if name in t:
                    w.writerow([t["n"], t["k"], t["d"], f"train_step_{name}", t[name].get("ms"), t[name].get("extra_mib"),
                                t[name]["status"], "", ""])
    md = markdown(meta, rows, train)
    (out / "nearest.md").write_text(md)
    if rows:
        from tokenizers_vq.eval.benchmarks.plots import search_plot  # noqa: PLC0415

        search_plot({"meta": meta, "cases": rows}, out / "nearest.png", floor_ms)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "results_tmp"))
    p.add_argument("--budget", type=float, default=420.0, help="seconds before peers are skipped")
    p.add_argument("--cases", default="", help="subset, e.g. '32768x100000x8,262144x262144x8' ('none': the training steps only)")
    args = p.parse_args()
    start = time.time()
    nearest = _kernels()
    import triton  # noqa: PLC0415

    try:
        import vector_quantize_pytorch as vqp  # noqa: PLC0415

        vqp_cls, vqp_ver = vqp.VectorQuantize, getattr(vqp, "__version__", None)
        if vqp_ver is None:
            from importlib.metadata import version  # noqa: PLC0415

            vqp_ver = version("vector-quantize-pytorch")
    except ImportError:
        vqp_cls, vqp_ver = None, "not installed"
    cases = ([] if args.cases == "none" else [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
             if args.cases else CASES)
    from tokenizers_vq.eval.benchmarks.peers import version  # noqa: PLC0415

    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "vqp": vqp_ver, "flash_kmeans": version("flash-kmeans"), "faiss": version("faiss-gpu-cu12"),
            "rates": device_rates()}
    out, rows, train = Path(args.out), [], None
    for n, k, d in cases:
        t0 = time.time()
        rows.append({"n": n, "k": k, "d": d, **run_case(n, k, d, nearest, vqp_cls, start + args.budget)})
        print(f"{n}x{k}x{d}: {time.time() - t0:.1f}s " + json.dumps(rows[-1], default=str), flush=True)
        write(out, meta, rows, train)
    train = vq_train_steps(vqp_cls, deadline=start + args.budget + 120, done=lambda t: write(out, meta, rows, t))
    print(markdown(meta, rows, train), flush=True)
    write(out, meta, rows, train)


if __name__ == "__main__":
    main()
