"""The direct relaunch of compiled Triton kernels, on any machine: Triton's own launch is
replaced by a recorder that returns a fake compiled kernel, so the test sees which calls go
through Triton (first call of a specialisation) and which arguments reach the launcher."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
relaunch = pytest.importorskip("tokenizers_vq.kernels.relaunch")


@triton.jit
def _kernel(X, Y, N, sx, FLAG: tl.constexpr, BLOCK: tl.constexpr = 16, OPT=None, LAST: tl.constexpr = 3):
    pass


class _Compiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append(("direct", args))


@pytest.fixture
def recorded(monkeypatch):
    log = []

    def triton_run(*args, grid, warmup, **kwargs):
        log.append(("triton", grid, args, kwargs))
        return _Compiled(log)

    monkeypatch.setattr(_kernel, "run", triton_run)
    monkeypatch.setattr(relaunch, "_stream", lambda: (0, 1234))
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    relaunch.clear()
    yield log
    relaunch.clear()


def test_second_call_goes_to_the_launcher_with_every_parameter_in_order(recorded):
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        relaunch.launch(_kernel, (5, 2), x, y, 64, 1, FLAG=True, num_warps=4)
    assert [e[0] for e in recorded] == ["triton", "direct", "direct"]
    args = recorded[1][1]
    assert args[:4] == (5, 2, 1, 1234)  # grid (padded to 3), stream
    assert args[4:9] == ("fn", "meta", None, None, None)
    assert args[9:13] == (x, y, 64, 1)
    assert args[13:] == (True, 16, None, 3)  # FLAG, then BLOCK, OPT, LAST at their defaults


def test_a_new_specialisation_goes_through_triton_again(recorded):
    buf = torch.zeros(65)
    calls = [((buf[:64], buf[:64], 64, 1), {"FLAG": True}),
             ((buf[1:], buf[:64], 64, 1), {"FLAG": True}),  # unaligned pointer
             ((buf[:64].double(), buf[:64], 64, 1), {"FLAG": True}),  # dtype
             ((buf[:64], buf[:64], 32, 1), {"FLAG": True}),  # an int
             ((buf[:64], buf[:64], 64, 1), {"FLAG": False}),  # a constexpr
             ((buf[:64], buf[:64], 64, 1), {"FLAG": True, "OPT": buf[:8]}),  # None -> tensor
             ((buf[:64], buf[:64], 64, 1), {"FLAG": True, "num_warps": 8})]  # a launch option
    for args, meta in calls:
        relaunch.launch(_kernel, (1,), *args, **meta)
    assert [e[0] for e in recorded] == ["triton"] * len(calls)
    for args, meta in calls:
        relaunch.launch(_kernel, (1,), *args, **meta)
    assert [e[0] for e in recorded[len(calls):]] == ["direct"] * len(calls)


def test_grid_callable_sees_the_tuned_config(recorded, monkeypatch):
    class Tuned:  # an autotuner's surface: .fn, .best_config, [grid]
        fn = _kernel
        best_config = triton.Config({"BLOCK": 32}, num_warps=8)

        def __getitem__(self, grid):
            return lambda *a, **k: _kernel[grid](*a, **k, **self.best_config.kwargs)

    tuned = Tuned()
    x = torch.zeros(64)
    for n in (64, 64, 100):
        relaunch.launch(tuned, lambda m: (-(-n // m["BLOCK"]),), x, x, 64, 1, FLAG=True)
    assert [e[0] for e in recorded] == ["triton", "direct", "direct"]
    assert recorded[2][1][0] == 4 and recorded[2][1][13:] == (True, 32, None, 3)  # cdiv(100, 32), BLOCK from the config


def test_hooks_and_the_switch_bypass_the_direct_path(recorded, monkeypatch):
    x = torch.zeros(64)
    relaunch.launch(_kernel, (1,), x, x, 64, 1, FLAG=True)
    runtime, hook = triton.knobs.runtime, (lambda *a: None)  # a profiler's hook
    before = runtime.launch_enter_hook
    if hasattr(before, "add"):  # a chain of hooks (newer Triton), else one hook
        before.add(hook)
    else:
        runtime.launch_enter_hook = hook
    try:
        assert relaunch._hooks_active()
        relaunch.launch(_kernel, (1,), x, x, 64, 1, FLAG=True)
    finally:
        if hasattr(before, "remove"):
            before.remove(hook)
        else:
            runtime.launch_enter_hook = before
    assert not relaunch._hooks_active()
    monkeypatch.setattr(relaunch, "ENABLED", False)
    relaunch.launch(_kernel, (1,), x, x, 64, 1, FLAG=True)
    assert [e[0] for e in recorded] == ["triton"] * 3


def test_tensor_subclasses_are_keyed_by_dtype_and_alignment_and_the_cache_is_bounded(recorded, monkeypatch):
    """A Parameter is a tensor like any other (keyed by dtype and alignment, never kept itself),
    and the cache starts over past MAX_ENTRIES specialisations."""
    p32, p64 = torch.nn.Parameter(torch.zeros(64)), torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
    for p in (p32, p32, p64, p64):
        relaunch.launch(_kernel, (1,), p, p, 64, 1, FLAG=True)
    assert [e[0] for e in recorded] == ["triton", "direct", "triton", "direct"]
    assert not any(isinstance(v, torch.Tensor) for key in relaunch._ENTRIES for v in key)
    monkeypatch.setattr(relaunch, "MAX_ENTRIES", 2)
    for n in (1, 2, 3):
        relaunch.launch(_kernel, (1,), p32, p32, 64 * n, 1, FLAG=True)
    assert len(relaunch._ENTRIES) <= 2
