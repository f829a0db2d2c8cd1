"""Launching a compiled Triton kernel again without Triton's per-call Python.

``kernel[grid](*args, **meta)`` binds every argument, computes its specialisation and a
cache key, and looks the compiled kernel up, in Python, on every call: about 10 us per launch,
as long as a small search's kernels themselves. :func:`launch` does that once per
specialisation and afterwards hands the arguments straight to the compiled kernel's launcher.

The specialisation it keys on is at least as fine as Triton's own: every non-tensor argument's
value (ints, bools, ``None``, constexprs, ``num_warps``...) and every tensor's dtype and 16-byte
alignment, plus the current CUDA device. A kernel wrapped in ``triton.autotune`` is tuned on
its first call as usual; later calls reuse the tuned config. The fast path stands aside (the
plain launch runs) under the interpreter, when a launch hook is set (profilers), and when
:data:`ENABLED` is False.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
from torch import Tensor

ENABLED = True
"""Set False to launch every kernel through Triton's own call path (debugging)."""


class _Entry(NamedTuple):
    run: Callable
    function: Any
    packed_metadata: Any
    tail: tuple[tuple[str, Any], ...]  # (name, default) of each parameter past the positional ones
    config: dict  # the tuned config's meta-parameters (autotuned kernels), else empty


_ENTRIES: dict[tuple, _Entry] = {}
MAX_ENTRIES = 4096  # specialisations kept (every distinct shape is one); past it the cache starts over
_FIRST_CALLS = threading.Lock()  # a first call and the tuned config it leaves on the kernel stay together


def check_device(t: Tensor, what: str, fix: str) -> None:
    """Refuse a CPU tensor outside the interpreter, naming ``fix`` (Triton would fail on it with
    the CUDA runtime's bare AssertionError)."""
    if not t.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(f"{what} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); the input is on "
                         f"{t.device}: {fix}")


def _stream() -> tuple[int, int]:
    """``(device index, raw stream)`` Triton would launch on: the current device's current stream."""
    device = torch.cuda.current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


def _hooks_active() -> bool:
    """Whether a launch hook is set (a hook, or a non-empty chain of them)."""
    rt = triton.knobs.runtime
    return any(getattr(h, "calls", h) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _params(kernel) -> list[inspect.Parameter]:
    """The Python parameters of a ``triton.jit`` function, or of the one an autotuner wraps."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return list(inspect.signature(kernel.fn).parameters.values())


def _fill(kernel, n_args: int, compiled) -> _Entry | None:
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        return None
    params = _params(kernel)[n_args:]
    best = getattr(kernel, "best_config", None)
    return _Entry(compiled.run, compiled.function, compiled.packed_metadata,
                  tuple((p.name, p.default) for p in params), dict(best.kwargs) if best is not None else {})


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, through the kept compiled kernel after the first call.

    Args:
        kernel: a ``triton.jit`` function, or a ``triton.autotune`` wrapper of one.
        grid: the launch grid, a tuple or a callable of the meta-parameters (given here, and
            the tuned config's for an autotuned kernel).
        args: the kernel's leading parameters, positionally.
        meta: the rest by name (tensors among them too), with launch options
            (``num_warps``, ``num_stages``).
    """
    if not ENABLED or triton.knobs.runtime.interpret or _hooks_active():
        kernel[grid](*args, **meta)
        return
    device, stream = _stream()
    # the specialisation, flat: every non-tensor value, each tensor's (subclasses too) dtype and
    # 16-byte alignment; no tensor itself is kept
    key = (id(kernel), device, len(args), *meta,
           *[(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, Tensor) else a for a in args],
           *[(v.dtype, v.data_ptr() & 15 == 0) if isinstance(v, Tensor) else v for v in meta.values()])
    entry = _ENTRIES.get(key)
    if entry is None:  # Triton's own launch (compiles, tunes)
        with _FIRST_CALLS:
            compiled = kernel[grid](*args, **meta)
            entry = _fill(kernel, len(args), compiled)
            if entry is not None:
                if len(_ENTRIES) >= MAX_ENTRIES:
                    _ENTRIES.clear()
                _ENTRIES[key] = entry
        return
    if entry.config:
        meta = {**meta, **entry.config}
    g = grid(meta) if callable(grid) else grid
    entry.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, entry.function,
              entry.packed_metadata, None, None, None, *args, *[meta.get(n, d) for n, d in entry.tail])


def clear() -> None:
    """Forget every kept kernel (the next launch of each goes through Triton again)."""
    _ENTRIES.clear()
