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
    and the kept specialisations and call sites start over past their bounds."""
    p32, p64 = torch.nn.Parameter(torch.zeros(64)), torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
    for p in (p32, p32, p64, p64):
        relaunch.launch(_kernel, (1,), p, p, 64, 1, FLAG=True, OPT=p)
    assert [e[0] for e in recorded] == ["triton", "direct", "triton", "direct"]
    sites = list(relaunch._SITES.values())
    assert not any(isinstance(v, torch.Tensor) for key in relaunch._SITES for v in key)
    assert not any(isinstance(v, torch.Tensor) for site in sites for key in site._kept for v in key)
    assert not any(isinstance(v, torch.Tensor) for site in sites for kept in site._kept.values() for v in kept[1])
    monkeypatch.setattr(relaunch.Launcher, "MAX_KEPT", 2)
    for n in (1, 2, 3):
        relaunch.launch(_kernel, (1,), p32, p32, 64 * n, 1, FLAG=True)
    assert all(len(site._kept) <= 2 for site in relaunch._SITES.values())
    monkeypatch.setattr(relaunch, "MAX_SITES", 2)
    for flag in (True, False, None):
        relaunch.launch(_kernel, (1,), p32, p32, 64, 1, FLAG=flag)
    assert len(relaunch._SITES) <= 2


def test_launch_evaluates_a_grid_function_on_every_call(recorded):
    """launch() cannot know what a grid function reads: it is called again on each launch."""
    x, size = torch.zeros(64), [3]

    def grid(meta):
        return (size[0],)

    for n in (3, 5):
        size[0] = n
        relaunch.launch(_kernel, grid, x, x, 64, 1, FLAG=True)
        relaunch.launch(_kernel, grid, x, x, 64, 1, FLAG=True)
    assert [e[0] for e in recorded] == ["triton", "direct", "direct", "direct"]
    assert recorded[1][1][0] == 3 and recorded[2][1][0] == 5 and recorded[3][1][0] == 5


def test_a_launcher_passes_fixed_and_per_call_parameters_in_order_and_keeps_no_tensor(recorded):
    x, y, opt = torch.zeros(64), torch.zeros(64), torch.zeros(8)
    site = relaunch.Launcher(_kernel, FLAG=True, num_warps=4)
    for _ in range(2):
        site((5, 2), x, y, 64, 1, OPT=opt)
    site((7,), x, y, 64, 1, OPT=opt)  # a tuple grid is taken as given on every call
    assert [e[0] for e in recorded] == ["triton", "direct", "direct"]
    assert recorded[0][3]["FLAG"] is True and recorded[0][3]["OPT"] is opt and recorded[0][3]["num_warps"] == 4
    args = recorded[1][1]
    assert args[:4] == (5, 2, 1, 1234) and args[4:9] == ("fn", "meta", None, None, None)
    assert args[9:13] == (x, y, 64, 1)
    assert args[13:15] == (True, 16) and args[15] is opt and args[16] == 3  # FLAG, BLOCK, OPT (this call's), LAST
    assert recorded[2][1][:3] == (7, 1, 1)
    other = torch.zeros(8)
    site((5, 2), x, y, 64, 1, OPT=other)  # another tensor of the same dtype and alignment: the same specialisation
    assert recorded[-1][0] == "direct" and recorded[-1][1][15] is other
    kept = [v for entry in site._kept.values() for v in entry[1]]
    assert not any(isinstance(v, torch.Tensor) for v in kept)
    with pytest.raises(TypeError, match="hold no tensors"):
        relaunch.Launcher(_kernel, OPT=opt)


def test_a_launcher_specialises_as_triton_does(recorded):
    buf = torch.zeros(65)
    site = relaunch.Launcher(_kernel, FLAG=True)
    calls = [((buf[:64], buf[:64], 64, 1), {}),
             ((buf[1:], buf[:64], 64, 1), {}),  # unaligned pointer
             ((buf[:64].double(), buf[:64], 64, 1), {}),  # dtype
             ((buf[:64], buf[:64], 32, 1), {}),  # an int
             ((buf[:64], buf[:64], 64, 1), {"OPT": buf[:8]}),  # None -> tensor
             ((buf[:64], buf[:64], 64, 1), {"OPT": buf[:8].double()})]  # its dtype
    for _ in range(2):
        for args, more in calls:
            site((1,), *args, **more)
    assert [e[0] for e in recorded] == ["triton"] * len(calls) + ["direct"] * len(calls)
    relaunch.clear()  # forgets what launchers kept too
    site((1,), *calls[0][0])
    assert recorded[-1][0] == "triton"
    site.MAX_KEPT = 2
    for n in (1, 2, 3):
        site((1,), buf[:64], buf[:64], 64 * n, 1)
    assert len(site._kept) <= 2


def test_a_launcher_evaluates_a_callable_grid_once_per_grid_with_the_tuned_config(recorded):
    class Tuned:  # an autotuner's surface: .fn, .best_config, [grid]
        fn = _kernel
        best_config = triton.Config({"BLOCK": 32}, num_warps=8)

        def __getitem__(self, grid):
            return lambda *a, **k: _kernel[grid](*a, **k, **self.best_config.kwargs)

    seen = []

    def grid(meta):
        seen.append(meta["BLOCK"])
        return (-(-100 // meta["BLOCK"]),)

    site, x = relaunch.Launcher(Tuned(), FLAG=True), torch.zeros(64)
    for _ in range(3):
        site(grid, x, x, 64, 1)
    assert [e[0] for e in recorded] == ["triton", "direct", "direct"]
    assert recorded[2][1][0] == 4 and recorded[2][1][13:] == (True, 32, None, 3)  # cdiv(100, 32), BLOCK from the config
    assert seen == [32]  # once for the kept launches (the recorder stands in for Triton's own call)
    site(lambda meta: (9,), x, x, 64, 1)  # another grid: evaluated again
    assert recorded[-1][1][0] == 9


def test_hooks_and_the_switch_bypass_a_launcher(recorded, monkeypatch):
    x = torch.zeros(64)
    site = relaunch.Launcher(_kernel, FLAG=True)
    site((1,), x, x, 64, 1)
    hooked = [True]
    monkeypatch.setattr(relaunch, "_hooks_active", lambda: hooked[0])  # a profiler's hook
    site((1,), x, x, 64, 1)
    hooked[0] = False
    monkeypatch.setattr(relaunch, "ENABLED", False)
    site((1,), x, x, 64, 1)
    monkeypatch.setattr(relaunch, "ENABLED", True)
    site((1,), x, x, 64, 1)
    assert [e[0] for e in recorded] == ["triton"] * 3 + ["direct"]
