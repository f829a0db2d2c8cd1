"""Launching a compiled Triton kernel again without Triton's per-call Python.

``kernel[grid](*args, **meta)`` binds every argument, computes its specialisation and a
cache key, and looks the compiled kernel up, in Python, on every call: about 10 us per launch,
as long as a small search's kernels themselves. :func:`launch` does that once per
specialisation and afterwards hands the arguments straight to the compiled kernel's launcher;
a :class:`Launcher` does the same for one call site whose meta-parameters stay fixed, with the
part of the work they decide done once (the search's launch setup keeps one per kernel and shape).

The specialisation it keys on is at least as fine as Triton's own: every non-tensor argument's
value (ints, bools, ``None``, constexprs, ``num_warps``...) and every tensor's dtype and 16-byte
alignment, plus the current CUDA device. A kernel wrapped in ``triton.autotune`` is tuned on
its first call as usual; later calls reuse the tuned config. The fast path stands aside (the
plain launch runs) under the interpreter, when a launch hook is set (profilers), and when
:data:`ENABLED` is False.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
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


_SITES: dict[tuple, Launcher] = {}
MAX_SITES = 1024  # launch()'s call sites kept (a kernel and its non-tensor meta-parameters); past it they start over
_FIRST_CALLS = threading.Lock()  # a first call and the tuned config it leaves on the kernel stay together


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (``TRITON_INTERPRET=1``; under ``torch.compile``,
    which cannot trace Triton's reading of it, the variable as Triton reads it)."""
    if torch.compiler.is_compiling():
        return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")
    return bool(triton.knobs.runtime.interpret)


def check_device(t: Tensor, what: str, fix: str) -> None:
    """Refuse a CPU tensor outside the interpreter, naming ``fix`` (Triton would fail on it with
    the CUDA runtime's bare AssertionError)."""
    if not t.is_cuda and not interpreting():
        raise ValueError(f"{what} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); the input is on "
                         f"{t.device}: {fix}")


def _stream() -> tuple[int, int]:
    """``(device index, raw stream)`` Triton would launch on: the current device's current stream."""
    device = torch.cuda.current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


def _hooks_active() -> bool:
    """Whether a launch hook is set (a hook, or a non-empty chain of them)."""
    rt = triton.knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return (enter is not None and bool(getattr(enter, "calls", enter))) or \
        (leave is not None and bool(getattr(leave, "calls", leave)))


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
    more = {name: v for name, v in meta.items() if isinstance(v, Tensor)}
    fixed = {name: v for name, v in meta.items() if name not in more} if more else meta
    key = (id(kernel), *fixed.items())
    site = _SITES.get(key)
    if site is None:
        if len(_SITES) >= MAX_SITES:
            _SITES.clear()
        site = _SITES[key] = Launcher(kernel, **fixed)  # (it holds the kernel, so the id stays its own)
        site.keep_grid = False  # a grid function here may read other values each call
    site(grid, *args, **more)


class Launcher:
    """One call site's launches of ``kernel`` with fixed meta-parameters: ``launcher(grid, *args,
    **more)`` is ``kernel[grid](*args, **fixed, **more)``, through the kept compiled kernel after
    the first call of each specialisation (see the module's note), with the part of the key and
    of the launcher's arguments that ``fixed`` gives worked out once. ``fixed`` holds no tensors
    (they go in ``more``). A callable grid is evaluated once per specialisation while the same
    grid object is passed (with :attr:`keep_grid`; else on every call)."""

    MAX_KEPT = 64  # specialisations kept per call site (strides, alignments); past it they start over
    keep_grid = True  # a grid function's value kept while the same function is passed

    def __init__(self, kernel, **fixed):
        if any(isinstance(v, Tensor) for v in fixed.values()):
            raise TypeError("a Launcher's fixed meta-parameters hold no tensors: pass them in the call")
        self.kernel, self.fixed = kernel, fixed
        # key -> [entry, the values past args, more's slots among them, (grid function, its value) or None]
        self._kept: dict[tuple, list] = {}
        _LAUNCHERS.add(self)

    def __call__(self, grid, *args, **more) -> None:
        if not ENABLED or triton.knobs.runtime.interpret or _hooks_active():
            self.kernel[grid](*args, **self.fixed, **more)
            return
        device, stream = _stream()
        key = (device, len(args), *more, *[(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, Tensor) else a
                                           for a in (*args, *more.values())])
        kept = self._kept.get(key)
        if kept is None:
            with _FIRST_CALLS:  # Triton's own launch (compiles, tunes), kept for the next calls
                compiled = self.kernel[grid](*args, **self.fixed, **more)
                entry = _fill(self.kernel, len(args), compiled)
            if entry is not None:
                if len(self._kept) >= self.MAX_KEPT:
                    self._kept.clear()
                meta = {**self.fixed, **entry.config}
                tail = [meta.get(n, d) for n, d in entry.tail]  # the values past args; more's names filled per call
                slots = [(i, n) for i, (n, _) in enumerate(entry.tail) if n in more]  # (in more under this key)
                self._kept[key] = [entry, tail, slots, None]
            return
        entry, tail, slots, known = kept
        if not callable(grid):
            g = (*grid, 1, 1)
        elif known is not None and known[0] is grid:
            g = known[1]
        else:
            g = (*grid({**self.fixed, **more, **entry.config}), 1, 1)
            if self.keep_grid:
                kept[3] = (grid, g)
        if slots:
            tail = tail.copy()
            for i, name in slots:
                tail[i] = more[name]
        entry.run(g[0], g[1], g[2], stream, entry.function, entry.packed_metadata, None, None, None, *args, *tail)


_LAUNCHERS: weakref.WeakSet[Launcher] = weakref.WeakSet()  # for clear()


def clear() -> None:
    """Forget every kept kernel (the next launch of each goes through Triton again)."""
    _SITES.clear()
    for launcher in list(_LAUNCHERS):
        launcher._kept.clear()
