"""The nearest-code benchmark's tables: every method gets its column, derived columns are
computed from the measured ones, and a peer that did not import says why."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizers_vq.eval.benchmarks import nearest, peers

RATES = {"device": "test", "sms": 132, "sm_clock_mhz": 1980.0, "bf16_tflops": 700.0, "cuda_core_tops": 33.4}


def _ok(ms: float, mib: float = 1.0) -> dict:
    return {"ms": ms, "extra_mib": mib, "status": "ok"}


def test_markdown_derives_host_time_floor_and_peer_ratio(tmp_path):
    methods = {name: {"status": "skipped"} for name in nearest.METHODS}
    methods.update(ours_bf16=_ok(0.080), ours_bf16_graph=_ok(0.065), flash_kmeans_fp16=_ok(0.100),
                   faiss_fp32={"status": "not installed (faiss)"})
    row = {"n": 32768, "k": 1024, "d": 8, "methods": methods, "checks": {"flash_kmeans_fp16": {"mismatch": 3, "bad": 0}},
           "kernel": {"bf16": "packed", "fp32": "packed"}}
    train = [{"n": 32768, "k": 1024, "d": 256, "ours": _ok(0.4, 10), "ours_compiled": _ok(0.3, 10),
              "ours_compiled_graphs": {"status": "error: RuntimeError: capture failed"},
              "ours_graphed": _ok(0.25, 10), "ours_graph": _ok(0.27, 10), "search": _ok(0.2, 1), "search_graph": _ok(0.09, 1), "vqp": _ok(6.0, 1000),
              "vqp_compiled": _ok(3.0, 900)}]
    meta = {"date": "2026-01-01", "torch": torch.__version__, "triton": "-", "vqp": "-", "rates": RATES}
    md = nearest.write(tmp_path, meta, [row], train)
    line = next(ln for ln in md.splitlines() if ln.startswith("| 32768 x 1024 x 8 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = next(ln for ln in md.splitlines() if ln.startswith("| N x K x D |"))
    assert len(cells) == len(header.strip("|").split("|"))
    assert "0.080 (1)" in cells and "not installed (faiss)" in cells  # the reason, in its cell
    assert "15" in cells  # host us: eager 0.080 - graph 0.065 ms
    assert "1.25x" in cells  # flash-kmeans 0.100 / ours 0.080
    # the floor: 32768 x 1024 distances x 4 epilogue ops at 33.4 Tops = 4.02 us, above the
    # 2 x 32768 x 1024 x 8 flops at 700 Tflops = 0.77 us; 4.02 us of 80 us is 5%
    assert nearest.floor_ms(32768, 1024, 8, RATES) == pytest.approx((4.018e-3, 4.018e-3), rel=1e-3)
    assert "5%" in cells
    assert "3, 0" in line
    step = next(ln for ln in md.splitlines() if ln.startswith("| 32768 x 1024 x 256 |"))
    assert "1.25x" in step and "0.010" in step  # best of eager/compiled/graphed vs search; memory against theirs
    assert "| 15.0x | 12.0x |" in step  # theirs 6.0 ms against our eager 0.4; their fastest 3.0 against our 0.25
    assert "0.065 (-)" in line  # the CUDA graph's memory is its pool, not measured
    assert "3.00x" in step and "| error |" in step  # graph 0.27 / search graph 0.09; a failed mode says so
    step_header = next(ln for ln in md.splitlines() if ln.startswith("| N x K x D | ours |"))
    assert len(step.strip("|").split("|")) == len(step_header.strip("|").split("|"))
    assert (tmp_path / "nearest.csv").read_text().count("train_step_") == 9


def test_absent_peers_are_reported_not_raised():
    x, c = torch.randn(16, 8), torch.randn(4, 8)
    fn, inputs, status = peers.flash_kmeans(x, c)
    if fn is None:
        assert status.startswith("not installed") and inputs == ()
    fa, fa_status = peers.faiss_flat(x, c)
    assert (fa is None) == (fa_status != "ok")
    assert peers.version("no-such-distribution-here") == "not installed"


def test_cell_of_a_failed_method_shows_its_status():
    assert nearest._cell({"status": "OOM", "ms": math.nan}) == "OOM"
    assert nearest._ms({"status": "OOM", "ms": 1.0}) != nearest._ms({"status": "OOM", "ms": 1.0})  # nan


if __name__ == "__main__":
    pytest.main([__file__])


def test_the_benchmark_draws_each_case_that_ran_beside_its_floor(tmp_path, monkeypatch):
    import matplotlib.axes
    from PIL import Image

    from tokenizers_vq.eval.benchmarks import plots

    def case(n, k, d, **ms):
        methods = {name: {"status": "skipped"} for name in nearest.METHODS}
        methods.update({m: _ok(v) for m, v in ms.items()}, faiss_fp32={"status": "not installed (faiss)"})
        return {"n": n, "k": k, "d": d, "methods": methods, "checks": {}, "kernel": {}}

    rows = [case(32768, 16384, 256, ours_bf16=0.65, flash_kmeans_fp16=0.88), case(32768, 1024, 8, ours_bf16=0.017)]
    meta = {"date": "2026-01-01", "torch": torch.__version__, "triton": "-", "vqp": "-", "rates": RATES}
    nearest.write(tmp_path, meta, rows, None)
    with Image.open(tmp_path / "nearest.png") as im:
        assert im.format == "PNG" and im.width >= 700
    bars, floors = {}, []  # what the plot hands matplotlib: bars per method, a floor line per case
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, xs, ys, *a, **k: bars.setdefault(k["label"], list(ys)))
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, xs, ys, *a, **k: floors.append(ys[0]))
    plots.search_plot({"meta": meta, "cases": rows}, tmp_path / "again.png", nearest.floor_ms)
    assert bars == {"ours bf16 (eager call)": [0.017, 0.65], "flash-kmeans fp16": [0.88]}  # floor order; FAISS did not run
    assert floors == [nearest.floor_ms(32768, 1024, 8, RATES)[0], nearest.floor_ms(32768, 16384, 256, RATES)[0]]
