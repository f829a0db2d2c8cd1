"""Tokenizer API: any-size media, save/load, chunked audio, video clips, bad checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenizers_vq.tokenizer import QuantizerConfig, Tokenizer, TokenizerConfig

TINY = {
    "image": {"channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention": False, "latent_dim": 8},
    "audio": {"channels": 4, "strides": [2, 4], "latent_dim": 8, "decoder_dim": 16, "decoder_layers": 1},
    "video": {"channels": 8, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 1, "latent_dim": 8},
}


def tiny(modality: str, **kw) -> Tokenizer:
    torch.manual_seed(0)
    q = QuantizerConfig("vq", {"codebook_size": 32})
    return Tokenizer(TokenizerConfig(modality, TINY[modality], q, **kw)).eval()


@pytest.mark.parametrize("h,w", [(8, 8), (30, 41), (33, 17)])
def test_image_of_any_size_gives_ceil_tokens_and_decodes_to_its_size(h, w):
    tok = tiny("image")
    f = tok.backbone_config.downsample
    x = torch.rand(2, 3, h, w) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (2, math.ceil(h / f), math.ceil(w / f))
    assert tok.decode(codes, size=(h, w)).shape == (2, 3, h, w)


def test_forward_returns_reconstruction_losses_and_metrics():
    tok = tiny("image").train()
    out = tok(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out.reconstruction.shape == (2, 3, 16, 16)
    assert out.codes.shape == (2, 4, 4) and "commitment" in out.losses and "perplexity" in out.metrics


def test_save_and_load_rebuild_the_same_model(tmp_path):
    tok = tiny("image")
    tok.train()(torch.rand(4, 3, 16, 16))  # move the codebook statistics
    tok.eval().save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = Tokenizer.from_pretrained(tmp_path / "m")
    x = torch.rand(1, 3, 20, 24) * 2 - 1
    assert torch.equal(again.encode(x), tok.encode(x))
    assert torch.equal(again.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_half_precision_save_halves_the_file_and_loads_back_as_float32(tmp_path):
    tok = tiny("image")
    tok.train()(torch.rand(4, 3, 16, 16))
    tok.eval().save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "half", dtype=torch.float16)
    full, half = ((tmp_path / n / "model.safetensors").stat().st_size for n in ("full", "half"))
    assert half < 0.6 * full
    again = Tokenizer.from_pretrained(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in again.parameters())
    for (k, a), b in zip(tok.state_dict().items(), again.state_dict().values()):
        if a.is_floating_point():  # rounded to fp16, nothing else
            assert torch.equal(b, a.half().float()) or torch.equal(b, a), k
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert (again.decode(tok.encode(x)) - tok.decode(tok.encode(x))).abs().max() < 0.05
    with pytest.raises(ValueError, match="floating-point"):
        tok.save_pretrained(tmp_path / "bad", dtype=torch.int8)


def test_bad_checkpoint_directories_get_clear_errors(tmp_path):
    tiny("image").save_pretrained(tmp_path / "good")
    good_cfg = (tmp_path / "good" / "config.json").read_text()
    good_w = (tmp_path / "good" / "model.safetensors").read_bytes()

    def case(name, cfg=good_cfg, weights=good_w):
        d = tmp_path / name
        d.mkdir()
        if cfg is not None:
            (d / "config.json").write_text(cfg)
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        return d

    other = json.loads(good_cfg)
    other["backbone"]["channels"] = 16
    for d, msg in [
        (tmp_path / "nowhere", "missing"),
        (case("no_config", cfg=None), "config.json is missing"),
        (case("no_weights", weights=None), "model.safetensors is missing"),
        (case("bad_json", cfg="{not json"), "corrupt"),
        (case("truncated", weights=good_w[: len(good_w) // 2]), "corrupt weights"),
        (case("unknown_field", cfg=json.dumps({**json.loads(good_cfg), "colour": 1})), "unknown"),
        (case("mismatch", cfg=json.dumps(other)), "size mismatch|does not fit"),
    ]:
        with pytest.raises((ValueError, RuntimeError), match=msg):
            Tokenizer.from_pretrained(d)


def test_long_audio_is_chunked_with_overlap_and_matches_one_pass():
    tok = tiny("audio", chunk_frames=20, chunk_context=6)
    hop = tok.backbone_config.hop
    x = torch.randn(1, 1, 130 * hop + 5) * 0.3
    chunked = tok.encode(x)
    assert chunked.shape == (1, 131)
    tok.config.chunk_frames = 10_000
    whole = tok.encode(x)
    assert (chunked == whole).float().mean() > 0.95
    tok.config.chunk_frames = 20
    assert tok.decode(chunked, size=(x.shape[-1],)).shape == x.shape


def test_long_video_is_coded_in_clips():
    tok = tiny("video", clip_frames=9)
    x = torch.rand(1, 3, 20, 16, 24) * 2 - 1  # clips of 9, 9 and 2 frames
    codes = tok.encode(x)
    assert codes.shape == (1, 3 + 3 + 2, 2, 3)
    assert tok.decode(codes, size=(20, 16, 24)).shape == x.shape


@pytest.mark.parametrize("modality,x,msg", [
    ("image", torch.rand(1, 3, 1, 1), "at least 8x8"),
    ("image", torch.rand(3, 16, 16), "4 axes"),
    ("audio", torch.zeros(1, 1, 0), "empty"),
    ("image", torch.full((1, 3, 16, 16), float("nan")), "NaN"),
    ("video", torch.randint(0, 255, (1, 3, 5, 16, 16)), "floating-point"),
])
def test_bad_media_tensors_raise(modality, x, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(modality).encode(x)
