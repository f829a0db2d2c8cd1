"""Where the VQ-EMA training step's time goes (the search benchmark's step: forward, backward
and EMA update of ``VectorQuantizer``), eager and under ``torch.compile(fullgraph=True)``:
ms per step, operators and kernel launches per step, then the top operators by device and by
host time under ``torch.profiler`` and every kernel of one step in order; with ``--host``, also the host's own time per step (the
step enqueued behind a long GPU sleep, so no GPU work is waited for unless the step syncs), the
host syncs of one step (``torch.cuda.set_sync_debug_mode``, with where they come from) and the
Python functions that take the host's time (``cProfile``). With ``--graphs``, the compiled step
runs with ``mode="reduce-overhead"`` (replayed from CUDA graphs); run it under
``TORCH_LOGS=perf_hints`` to see why a graph is skipped, if one is.

    python eval/gpu/profile_vq_step.py [--cases 32768x1024x256,32768x16384x8] [--device cuda] [--host] [--graphs]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import time
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def step_fn(n: int, k: int, d: int, device: str, compiled: bool, graphs: bool = False):
    """One training step of a fresh ``VectorQuantizer`` on ``(n // 1024, 1024, d)`` latents
    (``n``: a multiple of 1024); ``graphs``: compiled with ``mode="reduce-overhead"``."""
    from tokenizers_vq import VectorQuantizer  # noqa: PLC0415

    if n % 1024:
        raise ValueError(f"n={n}: the step's latents are (n // 1024, 1024, d); give a multiple of 1024")
    torch.manual_seed(0)
    z = torch.randn(n // 1024, 1024, d, device=device, requires_grad=True)
    g, one = torch.randn_like(z) / z.numel(), torch.ones((), device=device)  # as the benchmark's step (peers.py)
    q = VectorQuantizer(dim=d, codebook_size=k, check_finite=False).to(device).train()
    model = torch.compile(q, fullgraph=True, mode="reduce-overhead" if graphs else None) if compiled else q

    def run():
        if compiled and graphs:
            torch.compiler.cudagraph_mark_step_begin()
        z.grad = None
        out = model(z)
        torch.autograd.backward([out.quantized, *out.losses.values()], [g, *[one] * len(out.losses)])

    return run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_case(n: int, k: int, d: int, device: str, compiled: bool, steps: int = 20, graphs: bool = False) -> str:
    run = step_fn(n, k, d, device, compiled, graphs)
    for _ in range(5):
        run()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(device)
    ms = (time.perf_counter() - t) / steps * 1e3
    kind = ("compiled, CUDA graphs" if graphs else "compiled") if compiled else "eager"
    lines = [f"## {n} x {k} x {d}, {kind}: {ms:.3f} ms per step"]
    if not compiled:
        with _CountOps() as counter:
            run()
        lines.append(f"aten operators per step: {sum(counter.ops.values())}; most frequent: "
                     + ", ".join(f"{name} {c}" for name, c in counter.ops.most_common(12)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            run()
        _sync(device)
    events = prof.key_averages()
    if device == "cuda":
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
        replays = sum(e.count for e in events if e.key == "cudaGraphLaunch")
        lines.append(f"kernel launches per step: {launches / 5:.0f}; CUDA graph replays per step: {replays / 5:.0f}")
        lines.append(events.table(sort_by="cuda_time_total", row_limit=20))
        lines.append(device_work(prof, 5))
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=20))
    return "\n".join(lines)


def device_work(prof, steps: int) -> str:
    """Every kernel, copy and memset a step runs on the device, in launch order, with its time."""
    from torch.autograd import DeviceType  # noqa: PLC0415

    work = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    work.sort(key=lambda e: e.time_range.start)
    per = len(work) // steps
    if per * steps != len(work):  # the steps differ: positions would not name the same kernel
        return f"device work: {len(work)} items over {steps} steps, not the same in each; not listed"
    lines = [f"device work of one step, in order ({per} items; us each, the median over {steps} steps):"]
    for i in range(per):
        same = sorted(work[j * per + i].time_range.elapsed_us() for j in range(steps))
        lines.append(f"  {same[steps // 2]:8.1f}  {work[i].name[:110]}")
    lines.append(f"  {sum(e.time_range.elapsed_us() for e in work) / steps:8.1f}  total")
    return "\n".join(lines)


def host_report(n: int, k: int, d: int, compiled: bool, steps: int = 20) -> str:
    """Host ms per step with the GPU kept busy (a step that syncs waits out the sleep and
    shows it), the syncs of one step and where they are, and the top Python functions."""
    run = step_fn(n, k, d, "cuda", compiled)
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the steps
    each = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        each.append((time.perf_counter() - t) * 1e3)
    host_ms = sorted(each)[steps // 2]  # the median: a step that finds the launch queue full waits out the sleep
    torch.cuda.synchronize()
    lines = [f"## {n} x {k} x {d}, {'compiled' if compiled else 'eager'}: host {host_ms:.3f} ms per step, the median "
             "(enqueued behind a GPU sleep); each step: " + " ".join(f"{t:.2f}" for t in each)]
    # the operator that waits for the GPU, if one does: it takes the sleep's second on the host
    torch.cuda._sleep(2_000_000_000)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        run()
    torch.cuda.synchronize()
    lines.append("one step behind a GPU sleep, top operators by host time:\n"
                 + prof.key_averages(group_by_stack_n=6).table(sort_by="self_cpu_time_total", row_limit=6,
                                                               max_name_column_width=60))
    sites: collections.Counter = collections.Counter()

    def where(message, *_):  # the innermost caller outside torch, not the warning's own line
        if "synchroniz" in str(message).lower():
            outside = [f for f in traceback.extract_stack()[:-1]
                       if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
            sites[f"{outside[-1].filename}:{outside[-1].lineno}" if outside else "?"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = where
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines.append(f"host syncs in one step: {sum(sites.values())}"
                 + "".join(f"\n  {c} x {site}" for site, c in sites.most_common()))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        run()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    lines.append(f"cProfile over {steps} steps, by own time:\n" + buf.getvalue()[-6000:])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="32768x1024x256,32768x16384x8")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eager-only", action="store_true", help="leave the compiled step out")
    ap.add_argument("--host", action="store_true", help="the host's time, syncs and Python per step (CUDA) instead")
    ap.add_argument("--graphs", action="store_true", help="the compiled step with mode='reduce-overhead' (CUDA graphs)")
    args = ap.parse_args(argv)
    if args.host and args.device != "cuda":
        ap.error("--host measures a CUDA device's host side: run it where CUDA is")
    for case in args.cases.split(","):
        n, k, d = map(int, case.split("x"))
        for compiled in (False,) if args.eager_only else (False, True):
            try:
                report = (host_report(n, k, d, compiled) if args.host
                          else profile_case(n, k, d, args.device, compiled, graphs=args.graphs and compiled))
            except Exception:  # noqa: BLE001  (one failing variant leaves the others measured)
                report = f"## {n} x {k} x {d}, compiled={compiled}: failed\n{traceback.format_exc()}"
            print(report, flush=True)


if __name__ == "__main__":
    main()
