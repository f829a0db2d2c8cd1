"""`tvq eval` on a small saved model and real data."""

from __future__ import annotations

import json

import pytest
import torch
from test_tokenizer import tiny
from testdata import shared_path

from tokenizers_vq.cli import main
from tokenizers_vq.eval.metrics import psnr
from tokenizers_vq.io import load_image
from tokenizers_vq.tokens import decode_record, encode_file


def test_tvq_eval_writes_every_file_and_its_numbers_are_the_metric_functions(tmp_path, capsys):
    model = tiny("image").save_pretrained(tmp_path / "model")
    data = tmp_path / "photos"
    data.mkdir()
    for p in sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:3]:
        (data / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"report.md", "metrics.json", "codebook_usage.png", "metric_distributions.png", "reconstructions.png"} <= names
    result = json.loads((out / "metrics.json").read_text())
    assert result["summary"]["items"] == 3
    assert "lpips" in result["skipped"] and "rfid" in result["skipped"]
    # the report's PSNR is the metric function on the model's own decode
    from tokenizers_vq.tokenizer import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_pretrained(model)
    direct = [psnr(decode_record(tok, encode_file(tok, f)), load_image(f)) for f in sorted(data.iterdir())]
    assert result["summary"]["psnr_db"] == pytest.approx(sum(direct) / 3, abs=1e-9)
    assert [it["psnr_db"] for it in result["items"]] == pytest.approx(direct, abs=1e-9)
    report = (out / "report.md").read_text()
    assert f"| psnr_db | {result['summary']['psnr_db']:.4f} |" in report and "skipped" in report
    assert torch.isfinite(torch.tensor(result["summary"]["usage"]))
