"""The host-cost measurement: stubbed launches leave the kernels in place afterwards, the
host path runs end to end on CPU tensors, and the numbers are real timings."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from tokenizers_vq.eval.benchmarks import host_cost  # noqa: E402
from tokenizers_vq.kernels import nearest, packed, packed_launch, tiled, tiles  # noqa: E402


def test_stubs_run_the_host_path_and_are_removed_afterwards():
    before = (tiled._nearest_kernel, packed._packed_kernel, tiles._interpret, packed_launch._interpret)
    x, c = torch.randn(300, 8).bfloat16(), torch.randn(50, 8).bfloat16()
    with host_cost.stubbed_launches():
        assert isinstance(tiled._nearest_kernel, host_cost._NoLaunch)
        dist, idx = nearest.nearest_codes_triton(x, c)  # the packed path, nothing launched
        assert dist.shape == idx.shape == (300,) and idx.dtype == torch.int64
        _, idx = nearest.nearest_codes_triton(x.float(), c.float(), metric="cosine", k=3)  # v1 top-k
        assert idx.shape == (300, 3)
    assert (tiled._nearest_kernel, packed._packed_kernel, tiles._interpret, packed_launch._interpret) == before


def test_measure_reports_microseconds_for_both_entry_points():
    row = host_cost.measure(1024, 256, 8)
    assert set(row) == {"public_us", "impl_us"}
    assert all(math.isfinite(v) and 0 < v < 1e5 for v in row.values())
