"""The rounding-gap measure: FSQ's unrounded output sits within half a step of the rounded
one, and the script reports both reconstructions of real media."""

from __future__ import annotations

import json

import pytest
import torch
from testdata import shared_path

from tokenizers_vq.eval import rounding_gap
from tokenizers_vq.quantizers.fsq import FSQ
from tokenizers_vq.tokenizer import QuantizerConfig, Tokenizer, TokenizerConfig


def test_unrounded_is_the_bounded_latent_within_half_a_step_of_the_codes():
    torch.manual_seed(0)
    q = FSQ(dim=4, levels=[8, 5, 5, 3]).eval()  # dim == channels: no projection between
    z = torch.randn(2, 50, 4) * 2
    rounded, unrounded = q(z).quantized, q.unrounded(z)
    half_step = 0.5 / (q._levels // 2).float()
    assert (rounded - unrounded).abs().le(half_step + 1e-6).all()
    assert not torch.equal(rounded, unrounded)


def test_script_reports_both_reconstructions_of_a_real_photo(tmp_path):
    photo = shared_path("images", "bsds500", "val", "101085.jpg")
    torch.manual_seed(0)
    cfg = TokenizerConfig("image", {"channels": 8, "channel_mult": [1, 2], "latent_dim": 4},
                          QuantizerConfig("fsq", {"levels": [5, 5, 5, 5]}))
    Tokenizer(cfg).save_pretrained(tmp_path / "model")
    rounding_gap.main(["--model", str(tmp_path / "model"), "--data", str(photo), "--max-side", "100",
                       "--out", str(tmp_path / "out")])
    (row,) = json.loads((tmp_path / "out" / "rounding_gap.json").read_text())["rows"]
    assert row["shape"][0] == 3 and max(row["shape"][1:]) <= 100 and all(s % 2 == 0 for s in row["shape"][1:])
    assert row["gap_db"] == pytest.approx(row["unrounded_db"] - row["rounded_db"])
    assert 0 < row["rounded_db"] < 60 and row["rounded_db"] != row["unrounded_db"]
    assert "| **mean** |" in (tmp_path / "out" / "rounding_gap.md").read_text()


def test_a_model_without_fsq_is_refused(tmp_path, capsys):
    photo = shared_path("images", "bsds500", "val", "101085.jpg")
    with pytest.raises(SystemExit):
        rounding_gap.main(["--model", "image", "--data", str(photo), "--out", str(tmp_path)])
    assert "needs FSQ" in capsys.readouterr().err
