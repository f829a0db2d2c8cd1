"""The embedded default image tokenizer: the README's main job, and golden values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokenizers_vq.cli import main
from tokenizers_vq.eval.metrics import psnr
from tokenizers_vq.media import bundled_photo, load_image
from tokenizers_vq.tokenizer import DEFAULT_MODEL, Tokenizer
from tokenizers_vq.tokens import load_tokens

GOLDEN = Path(__file__).parent / "golden" / "image_f16_grace_hopper.json"


def test_default_checkpoint_ships_inside_the_package_and_is_small():
    weights = DEFAULT_MODEL / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 16 * 2**20
    tok = Tokenizer.from_pretrained()
    assert tok.modality == "image" and tok.backbone_config.downsample == 16
    assert tok.quantizer.codebook_size == 1024


def test_main_job_round_trip_matches_the_golden_values(tmp_path, capsys):
    """`tvq encode <photo> -o photo.tvq && tvq decode photo.tvq -o photo_decoded.png`."""
    photo = bundled_photo()
    tokens, decoded = tmp_path / "photo.tvq", tmp_path / "photo_decoded.png"
    assert main(["encode", str(photo), "-o", str(tokens), "--device", "cpu"]) == 0
    assert main(["decode", str(tokens), "-o", str(decoded), "--device", "cpu"]) == 0
    _, [rec] = load_tokens(tokens)
    original, out = load_image(photo), load_image(decoded)
    assert out.shape == original.shape == (3, 600, 512)
    assert rec.codes.shape == (38, 32)
    golden = json.loads(GOLDEN.read_text())
    same = (rec.codes.long() == torch.tensor(golden["codes"])).float().mean().item()
    assert same >= 0.99, f"only {same:.1%} of the tokens match the golden tokens"
    assert psnr(out, original) == pytest.approx(golden["psnr_db"], abs=0.1)
