"""The export speed benchmark measures its rates on real photos."""

from __future__ import annotations

import json
import math

from testdata import shared_path

from tokenizers_vq.eval.benchmarks import export_speed


def test_three_rates_of_a_small_export(tmp_path):
    data = shared_path("images", "bsds500", "val")
    export_speed.main([str(data), "--out", str(tmp_path), "--max-items", "2", "--repeat", "4", "--workers", "0",
                       "--batch-size", "2", "--shard-items", "1", "--device", "cpu"])
    row = json.loads((tmp_path / "export_speed.json").read_text())["row"]
    assert row["items"] == 8
    rates = [row[k] for k in ("decode_bound_per_s", "encode_bound_fp32_per_s", "encode_bound_bf16_per_s",
                              "end_to_end_fp32_per_s", "running_fp32_per_s", "running_bf16_per_s",
                              "tvq_export_fp32_per_s", "tvq_export_bf16_per_s")]
    assert all(math.isfinite(r) and r > 0 for r in rates)
    assert row["end_to_end_fp32_per_s"] < row["decode_bound_per_s"]  # the export also encodes and writes
    # (which of the rates is higher depends on the machine's load: only the order of events is checked)
    assert row["later_shard_fp32_s"] > 0 and 0 < row["first_shard_fp32_s"] < 8 / row["end_to_end_fp32_per_s"]
    assert "| decode-bound" in (tmp_path / "export_speed.md").read_text()
    assert row["tvq_export_fp32_per_s"] < row["decode_bound_per_s"]  # its own process reads, encodes and writes
    assert 0 < row["first_read_fp32_s"] <= row["first_encoded_fp32_s"] <= row["first_shard_fp32_s"]
    assert "first shard was written" in (tmp_path / "export_speed.md").read_text()


def test_the_rates_of_an_export_of_resized_photos(tmp_path):
    data = shared_path("images", "bsds500", "val")
    export_speed.main([str(data), "--out", str(tmp_path), "--max-items", "2", "--repeat", "2", "--workers", "0",
                       "--shard-items", "2", "--device", "cpu", "--precisions", "fp32", "--resize", "64", "--center-crop"])
    result = json.loads((tmp_path / "export_speed.json").read_text())
    assert result["meta"]["resize"] == 64 and result["meta"]["center_crop"] is True
    assert all(math.isfinite(result["row"][k]) for k in ("encode_bound_fp32_per_s", "tvq_export_fp32_per_s"))
    assert "resized to a shorter side of 64 and cut to the central square" in (tmp_path / "export_speed.md").read_text()
