"""The code-search benchmark on CPU: a random-weight LFQ tokenizer, one real photo, both searches
from the same first generation; the map we return scores what we report."""

from __future__ import annotations

import importlib.util
import json
import math

import torch
from testdata import shared_path

from tokenizers_vq import QuantizerConfig, Tokenizer, TokenizerConfig
from tokenizers_vq.eval.benchmarks import code_search


def test_searches_run_and_are_reported(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig(quantizer=QuantizerConfig("lfq", {"num_bits": 6})))
    tok.save_pretrained(tmp_path / "model")
    photos = shared_path("images", "bsds500", "val")
    code_search.main(["--val", str(photos), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                      "--photos", "1", "--size", "32", "--population", "6", "--generations", "3"])
    found = json.loads((tmp_path / "out" / "code_search.json").read_text())
    (row,) = found["rows"]
    assert found["meta"]["bits"] == 6 and row["photo"].endswith(".jpg")
    assert math.isclose(row["ours_db"], row["ours_checked_db"], abs_tol=1e-4)
    assert row["ours_db"] >= row["encoder_db"] - 1e-4 and len(found["curves"][0]["ours"]) == 4
    if importlib.util.find_spec("vector_quantize_pytorch") is not None:
        assert len(found["curves"][0]["peer"]) == 4 and row["peer_reported_db"] >= row["encoder_db"] - 1e-4
        assert found["curves"][0]["peer"][0] == found["curves"][0]["ours"][0]  # the same first generation
    assert torch.is_grad_enabled()  # the benchmark leaves the process's grad mode as it found it
    table = (tmp_path / "out" / "code_search.md").read_text()
    assert "| **mean** |" in table and "--generations 3" in table
    assert (tmp_path / "out" / "code_search.png").stat().st_size > 1000


def test_first_generation_keeps_the_start_and_flips_bits():
    start = torch.zeros(1, 50, 50, dtype=torch.long)
    pop = code_search.first_generation(start, 8, 5, 0.1, seed=0)
    assert pop.shape == (5, 50, 50) and torch.equal(pop[0], start[0])
    flipped = ((pop[1:, ..., None] >> torch.arange(8)) & 1).float().mean()
    assert abs(float(flipped) - 0.1) < 0.01
