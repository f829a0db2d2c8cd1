"""The throughput benchmark's rows: real timings of the shipped models, consistent units."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizers_vq.eval.benchmarks.throughput import markdown, measure


@pytest.mark.parametrize("name", ["image", "speech"])
def test_rows_time_encode_and_decode_of_a_shipped_model(name):
    row = measure(name, 1, "fp32", torch.device("cpu"), min_seconds=0.0, max_reps=2)
    assert row["unit"] == ("images" if name == "image" else "audio s")
    enc, dec, both = row["encode_per_s"], row["decode_per_s"], row["both_per_s"]
    assert all(math.isfinite(v) and v > 0 for v in (enc, dec, both))
    assert both == pytest.approx(1 / (1 / enc + 1 / dec))  # the two in sequence
    md = markdown({"device_name": "cpu", "torch": torch.__version__, "threads": 1}, [row])
    assert f"| {name} | 1 | fp32 | no |" in md


def test_image_peer_row_times_our_backbone_with_the_outside_quantizer():
    pytest.importorskip("vector_quantize_pytorch")
    from tokenizers_vq.eval.benchmarks.throughput import measure_peer

    row = measure_peer("image", 2, "fp32", torch.device("cpu"), min_seconds=0.0, max_reps=2)
    assert row["model"].startswith("image peer: ") and row["unit"] == "images"
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("encode_per_s", "decode_per_s", "both_per_s"))
    assert f"| {row['model']} | 2 | fp32 | no |" in markdown({"device_name": "cpu", "torch": "-", "threads": 1}, [row])
