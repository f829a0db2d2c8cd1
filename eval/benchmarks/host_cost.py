"""The host (Python) cost of one nearest-code call, with every kernel launch stubbed out.

A small search is host-bound: its kernels take tens of microseconds, the Python around
them as long or longer. This times that Python alone, on any machine (no GPU needed): the
Triton kernels of :mod:`tokenizers_vq.kernels` are replaced by no-ops that accept the same
launch syntax, and the public call runs on CPU tensors of the case's shape. Two entry
points are timed: ``nearest_codes_triton`` as users call it (an eager call on plain tensors
goes straight to the implementation; ``torch.compile`` goes through the ``torch.library``
custom op) and the implementation itself, so the public wrapper's own cost shows apart.

    python -m tokenizers_vq.eval.benchmarks.host_cost              # the bench cases, microseconds per call
    python -m tokenizers_vq.eval.benchmarks.host_cost --gpu        # on a GPU: real calls, kept kernels vs Triton's launch

On a GPU, :func:`gpu_host_us` times real calls with and without the kept compiled kernels of
:mod:`~tokenizers_vq.kernels.relaunch`, and :func:`profile_gpu_calls` (also the sweep's
``profile`` part) profiles where their host time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator

import torch

CASES = [(32768, 1024, 8), (32768, 1024, 256), (32768, 4096, 8), (32768, 4096, 32), (32768, 16384, 8),
         (32768, 16384, 32), (32768, 16384, 256)]


class _NoCompiled:
    """Stands in for a compiled kernel: its launcher does nothing."""

    function = packed_metadata = None

    @staticmethod
    def run(*args) -> None:
        return None


class _NoLaunch:
    """Stands in for a ``@triton.jit`` or ``@triton.autotune`` kernel: ``kernel[grid](...)``
    and ``kernel.fn[grid](...)`` do nothing and return a compiled kernel that does nothing,
    so :mod:`~tokenizers_vq.kernels.relaunch` keeps it and later calls take its direct path."""

    def __init__(self, original):
        self.original, self.fn = original, self
        self.best_config = (getattr(original, "configs", None) or [None])[0]  # an autotuner's first config

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _NoCompiled()


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Every Triton kernel of the search modules replaced by :class:`_NoLaunch`, and the
    interpreter switch off (so the host takes its GPU branches), for the ``with`` block."""
    import triton  # noqa: PLC0415

    from tokenizers_vq.kernels import nearest, packed, packed_launch, relaunch, tiled, tiles, topk  # noqa: PLC0415

    saved = []
    for mod in (nearest, tiles, tiled, packed, packed_launch, topk):
        for name, obj in vars(mod).items():
            if isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
                saved.append((mod, name, obj))
                setattr(mod, name, _NoLaunch(obj))
        if hasattr(mod, "_interpret"):
            saved.append((mod, "_interpret", mod._interpret))
            mod._interpret = lambda: False
    real_params = relaunch._params
    saved += [(relaunch, n, getattr(relaunch, n)) for n in ("_stream", "_params", "check_device")]
    relaunch._stream = lambda: (0, 0)  # no CUDA device here
    relaunch.check_device = lambda *args: None
    relaunch._params = lambda kernel: real_params(kernel.original)
    relaunch.clear()
    packed_launch._setup.cache_clear()  # (its launch setups hold the kernels they launch)
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
        relaunch.clear()
        packed_launch._setup.cache_clear()


def host_us(fn, calls: int = 300, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean wall time of ``calls`` calls, in microseconds."""
    for _ in range(20):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return sorted(runs)[len(runs) // 2]


def measure(n: int, k: int, d: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Host microseconds per call of ``(N, d)`` queries against a ``(K, d)`` codebook."""
    from tokenizers_vq.kernels import nearest  # noqa: PLC0415

    x, c = torch.empty(n, d, dtype=dtype), torch.empty(k, d, dtype=dtype)
    with stubbed_launches():
        return {
            "public_us": host_us(lambda: nearest.nearest_codes_triton(x, c, return_dist=False)),
            "impl_us": host_us(lambda: nearest._nearest_impl(x, c, "l2", 0, "tf32", False, 0)),
        }


def profile_gpu_calls(rows: list) -> None:
    """cProfile of 500 default calls at 32768 x 1024 x 8 (bf16): where the host time goes."""
    import cProfile  # noqa: PLC0415
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    x = torch.randn(32768, 8, device="cuda").bfloat16()
    c = torch.randn(1024, 8, device="cuda").bfloat16()
    for alg in ("packed", "tiled"):
        for _ in range(20):
            nearest_codes_triton(x, c, algorithm=alg)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(500):
            nearest_codes_triton(x, c, algorithm=alg)
            torch.cuda.synchronize()
        synced = (time.perf_counter() - t) / 500 * 1e6
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            nearest_codes_triton(x, c, algorithm=alg)
        pr.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
        print(f"== {alg}: {synced:.0f} us per synchronised call", flush=True)
        print(buf.getvalue(), flush=True)
        rows.append({"part": "profile", "algorithm": alg, "us_per_synced_call": synced, "top": buf.getvalue()[:6000]})


def gpu_host_us(n: int, k: int, d: int, calls: int = 2000) -> dict[str, float]:
    """On a GPU: microseconds per eager bf16 call, timed on the host (no sync inside the loop, so
    a host-bound call shows its host time), with the kept compiled kernels
    (:mod:`~tokenizers_vq.kernels.relaunch`) and through Triton's own launch path."""
    from tokenizers_vq.kernels import relaunch  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    x = torch.randn(n, d, device="cuda").bfloat16()
    c = torch.randn(k, d, device="cuda").bfloat16()
    out = {}
    for name, enabled in (("relaunch_us", True), ("triton_launch_us", False)):
        relaunch.ENABLED = enabled
        try:
            out[name] = host_us(lambda: nearest_codes_triton(x, c), calls=calls, repeats=3)
            torch.cuda.synchronize()
        finally:
            relaunch.ENABLED = True
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="", help="subset, e.g. '32768x1024x8,32768x16384x32'")
    p.add_argument("--gpu", action="store_true", help="time real calls on the GPU and profile one case instead")
    args = p.parse_args(argv)
    if args.gpu:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")] if args.cases else CASES
        rows = [{"n": n, "k": k, "d": d, **gpu_host_us(n, k, d)} for n, k, d in cases]
        for r in rows:
            print(json.dumps(r), flush=True)
        profile_gpu_calls(rows)
        print(json.dumps({"torch": torch.__version__, "rows": rows}))
        return
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")] if args.cases else CASES
    rows = [{"n": n, "k": k, "d": d, **measure(n, k, d)} for n, k, d in cases]
    print("| N x K x d (bf16) | public call, us | implementation alone, us |\n|---|---|---|")
    for r in rows:
        print(f"| {r['n']} x {r['k']} x {r['d']} | {r['public_us']:.1f} | {r['impl_us']:.1f} |")
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
