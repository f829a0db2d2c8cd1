"""Where one small call of a shipped tokenizer spends its time (batch 1 by default): ms per
call of ``Tokenizer.encode`` / ``decode`` beside the bare backbone (``encoder`` then the
quantizer's ``encode``; the quantizer's ``decode`` then ``decoder``), operators and kernel
launches per call, the top operators by host time under ``torch.profiler``, and the Python
functions taking the most time (``cProfile``, cumulative).

    python eval/gpu/profile_tokenizer.py [--model image] [--batch 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tokenizers_vq.eval.benchmarks.throughput import INPUTS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ms(fn, device: torch.device, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[reps // 2]


def calls(model: str, batch: int, device: torch.device) -> dict:
    from tokenizers_vq import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_pretrained(model).eval().to(device)
    torch.manual_seed(0)
    x = (torch.rand(batch, *INPUTS[model], device=device) * 2 - 1) * (0.1 if model == "speech" else 1.0)
    size = tuple(INPUTS[model][1:])
    codes = tok.encode(x)
    latent = tok.quantizer.decode(codes).movedim(-1, 1)
    q = tok.quantizer
    return {"encode": lambda: tok.encode(x), "bare encode": lambda: q.encode(tok.encoder(x).movedim(1, -1)),
            "encoder alone": lambda: tok.encoder(x),
            "decode": lambda: tok.decode(codes, size), "bare decode": lambda: tok.decoder(q.decode(codes).movedim(-1, 1)),
            "decoder alone": lambda: tok.decoder(latent)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="image")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    with torch.inference_mode():
        fns = calls(args.model, args.batch, device)
        for name, fn in fns.items():
            print(f"{name}: {_ms(fn, device):.3f} ms per call", flush=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name in ("encode", "decode"):
            fn = fns[name]
            with profile(activities=acts) as prof:
                for _ in range(10):
                    fn()
                _sync(device)
            ev = prof.key_averages()
            launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
            syncs = sum(e.count for e in ev if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
            print(f"\n## {name}: {launches / 10:.0f} kernel launches, {syncs / 10:.1f} syncs or copies per call")
            print(ev.table(sort_by="self_cpu_time_total", row_limit=25))
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                fn()
            _sync(device)
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(35)
            print(s.getvalue())


if __name__ == "__main__":
    main()
