"""Training on a CUDA GPU in float16 (accelerate's GradScaler): the loss scale survives a
resume. Skipped without a GPU; run on one with ``pytest tests/train/test_gpu_training.py``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from trainrun import config

from tokenizers_vq.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (float16 training)")


def _log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_gpu_fp16_training_resumes_with_its_loss_scale(tmp_path):
    """8 steps straight against 4, a new Trainer, 4 more, in float16 with the discriminator on
    (two optimisers, one scaler): the resumed run starts from the saved loss scale, and both
    runs end with finite losses that agree."""
    over = {"mixed_precision": "fp16", "loss.adversarial": 0.1, "loss.disc_start": 2, "loss.lecam": 0.01}
    straight = Trainer(config("image", tmp_path / "a", 8, **over))
    straight.train()
    first = Trainer(config("image", tmp_path / "b", 8, **over, save_every=4, max_minutes=0))
    first.cfg.steps = 4
    first.train()
    saved = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["structure"]["scaler"]
    assert saved == first.acc.scaler.state_dict()
    resumed = Trainer(config("image", tmp_path / "b", 8, **over))
    assert resumed.step == 4 and resumed.acc.scaler.get_scale() == saved["scale"]
    assert resumed.acc.scaler.state_dict()["_growth_tracker"] == saved["_growth_tracker"]
    resumed.train()
    assert straight.acc.scaler.state_dict() == resumed.acc.scaler.state_dict()
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [line["step"] for line in b] == list(range(1, 9))
    assert all(math.isfinite(line["loss/total"]) for line in a + b)
    assert b[-1]["loss/total"] == pytest.approx(a[-1]["loss/total"], rel=0.02)  # cuDNN may sum in another order
    wa = load_file(tmp_path / "a" / "checkpoint" / "state.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint" / "state.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.isfinite(v).all() for k, v in wb.items() if v.is_floating_point())
