"""Tokenizer API: any-size media, save/load, chunked audio, video clips, bad checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from testdata import shared_path

from tokenizers_vq.media import load_image
from tokenizers_vq.media import load_audio
from tokenizers_vq.io import save_safetensors
from tokenizers_vq.modality import INPUT_LIMIT
from tokenizers_vq.quantizers import DynamicQuantizer, PackedCodes
from tokenizers_vq.tokenizer import DEFAULT_MODEL, QuantizerConfig, Tokenizer, TokenizerConfig

TINY = {
    "image": {"channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention": False, "latent_dim": 8},
    "audio": {"channels": 4, "strides": [2, 4], "latent_dim": 8, "decoder_dim": 16, "decoder_layers": 1},
    "video": {"channels": 8, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 1, "latent_dim": 8},
}


def tiny(modality: str, quantizer: QuantizerConfig | None = None, **kw) -> Tokenizer:
    torch.manual_seed(0)
    q = quantizer or QuantizerConfig("vq", {"codebook_size": 32})
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


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_file_without_training_state_codes_the_same_and_rebuilds_the_ema_sums(tmp_path, metric):
    from safetensors import safe_open  # noqa: PLC0415

    tok = tiny("image", QuantizerConfig("vq", {"codebook_size": 32, "metric": metric, "dead_code_threshold": 0.0}))
    for _ in range(5):  # EMA steps: the sums and counts the codebook is the smoothed mean of
        tok.train()(torch.rand(4, 3, 16, 16) * 2 - 1)
    tok.eval().save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "slim", training_state=False)
    with safe_open(tmp_path / "slim" / "model.safetensors", "pt") as f:
        assert "quantizer.embed_sum" not in f.keys() and "quantizer.cluster_size" in f.keys()
    full, slim = ((tmp_path / n / "model.safetensors").stat().st_size for n in ("full", "slim"))
    assert slim < full
    again = Tokenizer.from_pretrained(tmp_path / "slim")
    x = torch.rand(1, 3, 20, 24) * 2 - 1
    assert torch.equal(again.encode(x), tok.encode(x))
    from tokenizers_vq.export_record import weights_sha256  # noqa: PLC0415

    full_copy = Tokenizer.from_pretrained(tmp_path / "full")  # both copies are one model to token files
    assert weights_sha256(again) == weights_sha256(full_copy) != weights_sha256(full_copy, full=True)
    # the rebuilt sums give back the stored codebook (cosine: its directions, the sums' lengths are
    # not kept), so a run warm-started from the file goes on nearly as the saved one would
    a, b = again.quantizer.embed_sum, tok.quantizer.embed_sum
    if metric == "l2":
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) > 0.9999
    batch = torch.rand(4, 3, 16, 16) * 2 - 1
    tok.train()(batch), again.train()(batch)
    assert float((again.quantizer.embed - tok.quantizer.embed).abs().max()) < (1e-5 if metric == "l2" else 0.02)


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
    fewer_codes = json.loads(good_cfg)
    fewer_codes["quantizer"]["options"]["codebook_size"] //= 2
    past_memory = json.loads(good_cfg)
    past_memory["quantizer"]["options"]["codebook_size"] = 10**15
    flipped = bytearray(good_w)
    flipped[-5] ^= 0x10  # one bit of the last tensor's bytes: still a readable file
    nan = {k: v.clone() for k, v in load_file(tmp_path / "good" / "model.safetensors").items()}
    next(v for v in nan.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    save_safetensors(nan, tmp_path / "nan.safetensors", metadata={"format": "pt"})  # saved without a digest
    for d, msg in [
        (tmp_path / "nowhere", "missing"),
        (case("no_config", cfg=None), "config.json is missing"),
        (case("no_weights", weights=None), "model.safetensors is missing"),
        (case("bad_json", cfg="{not json"), "corrupt"),
        (case("truncated", weights=good_w[: len(good_w) // 2]), "corrupt weights"),
        (case("unknown_field", cfg=json.dumps({**json.loads(good_cfg), "colour": 1})), "unknown"),
        (case("mismatch", cfg=json.dumps(other)), "does not fit .*config.json.*restore"),
        (case("codebook_size", cfg=json.dumps(fewer_codes)), r"does not fit .*quantizer\..*in the file"),
        (case("past_memory", cfg=json.dumps(past_memory)), r"corrupt .*past_memory/config.json"),
        (case("flipped", weights=bytes(flipped)), r"corrupt weights file .*flipped.*differ from those it was saved"),
        (case("nan", weights=(tmp_path / "nan.safetensors").read_bytes()), r"nan/model.safetensors holds NaN"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Tokenizer.from_pretrained(d)
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    with safe_open(str(tmp_path / "good" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    resaved = case("resaved")  # the same tensors in another tool's layout, its header kept: the same model
    save_file(load_file(tmp_path / "good" / "model.safetensors"), resaved / "model.safetensors", metadata=meta)
    assert (resaved / "model.safetensors").read_bytes() != good_w
    assert torch.equal(Tokenizer.from_pretrained(resaved).encode(torch.zeros(1, 3, 16, 16)),
                       Tokenizer.from_pretrained(tmp_path / "good").encode(torch.zeros(1, 3, 16, 16)))


@pytest.mark.parametrize("modality, shape", [("video", (4, 3, 9, 32, 48)), ("audio", (4, 1, 16000)),
                                             ("image", (4, 3, 48, 64))])
def test_a_batch_codes_and_decodes_each_item_as_it_alone(modality, shape):
    """The CPU's convolutions sum a batch otherwise than one item (latents and decoded values
    move by ~1e-6, enough to flip a near-tie id with ``tvq export --batch-size``)."""
    tok = tiny(modality, QuantizerConfig("fsq", {"levels": [8] * 8}))
    torch.manual_seed(1)
    x = torch.rand(*shape) * 2 - 1
    codes = tok.encode(x)
    assert torch.equal(codes, torch.cat([tok.encode(item) for item in x.split(1)]))
    assert torch.equal(tok.decode(codes), torch.cat([tok.decode(item) for item in codes.split(1)]))


def test_long_audio_is_chunked_with_overlap_and_matches_one_pass():
    tok = tiny("audio", chunk_frames=20, chunk_context=6)
    hop = tok.backbone_config.hop
    x = torch.randn(1, 1, 130 * hop + 5) * 0.3
    chunked = tok.encode(x)
    assert chunked.shape == (1, 131)
    tok.config.chunk_frames = 10_000
    whole = tok.encode(x)
    assert (chunked != whole).sum() <= 1  # (a near-tie may flip one)
    one_pass = tok.decode(whole, size=(x.shape[-1],))
    tok.config.chunk_frames = 20
    in_chunks = tok.decode(whole, size=(x.shape[-1],))
    assert in_chunks.shape == x.shape
    torch.testing.assert_close(in_chunks, one_pass, rtol=0, atol=1e-2)  # (chunks without context: 0.3 apart)


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
    ("image", (torch.arange(768) % 255).reshape(1, 3, 16, 16).float(), r"values reach \[0, 254\].*x / 127.5 - 1"),
    ("video", torch.full((1, 3, 5, 16, 16), -4.5), r"values reach \[-4.5, -4.5\]"),
    ("audio", torch.linspace(-3000, 3000, 800).reshape(1, 1, 800), r"audio input values reach \[-3000, 3000\].*x / 32768"),
])
def test_bad_media_tensors_raise(modality, x, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(modality).encode(x)


def test_a_bad_item_of_a_batch_is_named_by_its_index():
    x = torch.zeros(3, 3, 16, 16)
    x[1, 0, 0, 0] = 200.0
    with pytest.raises(ValueError, match=r"image input values reach \[0, 200\].*\(item 1 of a batch of 3\)$"):
        tiny("image").encode(x)


def test_inputs_a_little_past_the_unit_range_are_coded():
    """Resampling and filtering overshoot [-1, 1] a little: that is coded, not refused."""
    torch.manual_seed(0)
    x = (torch.rand(1, 3, 16, 16) * 2 - 1) * 1.3
    x[0, 0, 0, 0] = -INPUT_LIMIT
    assert tiny("image").encode(x).shape == (1, 4, 4)  # the tiny model codes 4x4 pixels per token


# -- dynamic-length (DQ-VAE) models -------------------------------------------------------------
def tiny_dynamic(modality: str, levels: int = 1, calibrate_on: torch.Tensor | None = None) -> Tokenizer:
    """``tiny`` with ``QuantizerConfig.dynamic``; with ``calibrate_on`` (model-space media
    ``(1, C, ...)``) the router threshold makes about 30% of its regions fine."""
    q = QuantizerConfig("vq", {"codebook_size": 32}, levels=levels, dynamic={"target_fine_ratio": 0.3})
    tok = tiny(modality, q)
    if calibrate_on is not None:
        with torch.no_grad():
            z = tok.encoder(tok._pad(calibrate_on, mult=2)).movedim(1, -1)
        tok.quantizer.calibrate_threshold(z)
    return tok


def photo() -> torch.Tensor:
    """A real BSDS photo ``(1, 3, 481, 321)`` (portrait, odd on both axes) in [-1, 1]."""
    return load_image(sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0])[None] * 2 - 1


def speech() -> torch.Tensor:
    """A real spoken digit ``(1, 1, T)`` at 16 kHz, ``T`` not a multiple of the stride."""
    wav, _ = load_audio(sorted(shared_path("audio", "fsdd").glob("*.wav"))[0], 16_000)
    return wav.mean(0, keepdim=True)[None]


def assert_same_packed(a: PackedCodes, b: PackedCodes) -> None:
    assert a.shape == b.shape
    for key in ("codes", "positions", "fine", "offsets"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_dynamic_model_saves_and_loads_to_the_same_codes_and_reconstructions(tmp_path):
    x = photo()
    tok = tiny_dynamic("image")
    tok.train()(torch.rand(4, 3, 16, 16) * 2 - 1)  # move the codebook statistics and the threshold EMA
    tok.quantizer.calibrate_threshold(tok.encoder(tok._pad(x, mult=2)).detach().movedim(1, -1))
    tok.eval().save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["quantizer"]["dynamic"] == {"target_fine_ratio": 0.3}
    again = Tokenizer.from_pretrained(tmp_path / "m")
    assert isinstance(again.quantizer, DynamicQuantizer) and again.is_dynamic
    keys = set(again.state_dict())
    assert {"quantizer.threshold", "quantizer.router.0.weight"} <= keys
    assert any(k.startswith("quantizer.inner.") for k in keys)
    for k, v in tok.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert float(again.quantizer.threshold) != 0.0
    packed = tok.encode(x)
    assert_same_packed(again.encode(x), packed)
    assert 0 < int(packed.fine.sum()) < len(packed.fine)  # the calibrated router splits some regions
    assert torch.equal(again.decode(packed, size=x.shape[2:]), tok.decode(packed, size=x.shape[2:]))


def test_dynamic_encode_decode_of_odd_sized_photo_and_speech_keeps_their_size():
    for modality, x in [("image", photo()[..., :75, :97]), ("audio", speech())]:
        tok = tiny_dynamic(modality, calibrate_on=x)
        tok.config.chunk_frames, tok.config.chunk_context = 16, 4  # audio: coded whole all the same
        stride = tok.backbone_config.downsample if modality == "image" else tok.backbone_config.hop
        assert all(s % (2 * stride) for s in x.shape[2:])  # padding needed on every axis
        packed = tok.encode(x)
        assert isinstance(packed, PackedCodes) and packed.lengths.numel() == 1
        assert packed.shape == tuple(2 * math.ceil(s / (2 * stride)) for s in x.shape[2:])  # even latent
        n_regions, cells = math.prod(packed.shape) // 2 ** len(packed.shape), math.prod(packed.shape)
        assert n_regions < int(packed.lengths[0]) < cells  # between all-coarse and all-fine
        rec = tok.decode(packed, size=tuple(x.shape[2:]))
        assert rec.shape == x.shape and torch.isfinite(rec).all()
        z_q = tok.quantizer(tok.encoder(tok._pad(x, mult=2)).movedim(1, -1)).quantized  # eval forward
        whole = tok.decoder(z_q.movedim(-1, 1))[(..., *[slice(0, s) for s in x.shape[2:]])]
        assert torch.equal(rec, whole)  # one window, the quantizer's own eval path
        expected = (1 + 0.3 * (2 ** len(packed.shape) - 1)) / 2 ** len(packed.shape)
        per_unit = expected / stride**2 if modality == "image" else expected * 16_000 / stride
        assert tok.tokens_per_unit() == pytest.approx(per_unit)
    with pytest.raises(ValueError, match="PackedCodes of a dynamic-length"):
        tok.decode(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="dynamic-length bottleneck"):
        tiny("audio").decode(packed)
    with pytest.raises(ValueError, match="images and audio"):
        tiny_dynamic("video").encode(torch.rand(1, 3, 5, 16, 16) * 2 - 1)


def test_configs_without_the_dynamic_field_load_as_fixed_grids(tmp_path):
    raw = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert "dynamic" not in raw["quantizer"]  # the embedded default predates the field
    default = Tokenizer.from_pretrained()
    assert default.config.quantizer.dynamic is None and not default.is_dynamic
    assert default.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 2)
    tok = tiny("image")
    tok.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["quantizer"]["dynamic"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    x = torch.rand(1, 3, 20, 24) * 2 - 1
    assert torch.equal(Tokenizer.from_pretrained(tmp_path / "old").encode(x), tok.encode(x))
    cfg["quantizer"]["dynamic"] = {"target_fine_ratio": 0.3, "colour": 1}
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown DynamicQuantizer options"):
        Tokenizer.from_pretrained(tmp_path / "old")


@pytest.mark.parametrize("kind,options,expected", [
    ("vq", {"codebook_size": "1024"}, "codebook_size='1024' \\(str\\) for kind 'vq' should be int"),
    ("vq", {"metric": "manhattan"}, "should be one of 'l2', 'cosine'"),
    ("fsq", {"levels": [8, 5.5]}, "should be Sequence\\[int\\]"),
    ("lfq", {"num_bits": 10, "spherical": 1}, "spherical=1 \\(int\\).*should be bool"),
    ("vq", {"codebook_size": True}, "should be int"),
])
def test_quantizer_options_are_checked_against_their_types(kind, options, expected):
    with pytest.raises(ValueError, match=expected):
        QuantizerConfig(kind, options)
    QuantizerConfig("vq", {"codebook_size": 64, "codebook_dim": None, "decay": 1})  # ints pass as floats, None as None


def test_a_quantizer_of_your_own_is_named_by_import_path(tmp_path):
    """``kind="package.module:Class"`` builds (and rebuilds, from a saved model) any
    Quantizer subclass; a path that does not import or a class that is not a quantizer
    gets an error naming it."""
    torch.manual_seed(0)
    own = QuantizerConfig("tokenizers_vq.quantizers.fsq:FSQ", {"levels": [5, 5, 5]})
    tok = Tokenizer(TokenizerConfig("image", {"channels": 8, "channel_mult": [1, 2], "latent_dim": 4}, own)).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    back = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "m"))
    assert type(back.quantizer).__name__ == "FSQ" and torch.equal(back.encode(x), tok.encode(x))
    with pytest.raises(ValueError, match="cannot import Nope from tokenizers_vq.quantizers.fsq"):
        QuantizerConfig("tokenizers_vq.quantizers.fsq:Nope", {})
    with pytest.raises(ValueError, match="is not a Quantizer subclass"):
        QuantizerConfig("torch.nn:Linear", {})
    import sys

    assert "this" not in sys.modules
    with pytest.raises(ValueError, match="package 'this' is not imported; import it first"):
        QuantizerConfig("this:Zen", {})  # a saved config does not import (and run) a new package
    assert "this" not in sys.modules
    with pytest.raises(ValueError, match="unknown options \\['level'\\]"):
        QuantizerConfig("tokenizers_vq.quantizers.fsq:FSQ", {"level": [5]})


def test_encode_and_training_samples_leave_each_part_in_its_own_mode(tmp_path):
    from tokenizers_vq import samples  # noqa: PLC0415

    tok = tiny("image").train()
    tok.encoder.eval()  # a part frozen for fine-tuning the rest
    before = {k: v.clone() for k, v in tok.quantizer.state_dict().items()}
    tok.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert tok.training and tok.decoder.training and tok.quantizer.training and not tok.encoder.training
    assert all(torch.equal(before[k], v) for k, v in tok.quantizer.state_dict().items())  # encode trains nothing
    samples.write(tok, [shared_path("images", "bsds500", "val", "3096.jpg")], tmp_path / "samples", n_items=1)
    assert (tmp_path / "samples" / "reconstructions.png").is_file()
    assert tok.training and tok.decoder.training and not tok.encoder.training


def test_input_with_the_wrong_channel_count_is_named_with_the_shape_given():
    tok = tiny("video")
    with pytest.raises(ValueError, match=r"video input has 9 channels but this model expects 3 on axis 1 \(B, C, T, H, W\): "
                                         r"shape \(1, 9, 3, 16, 16\)"):
        tok.encode(torch.rand(1, 9, 3, 16, 16) * 2 - 1)  # frames first: (B, T, C, H, W) by mistake
    with pytest.raises(ValueError, match=r"audio input must have 3 axes \(B, 1, T\), got shape \(16000,\)"):
        tiny("audio").encode(torch.zeros(16000))


def test_a_dynamic_model_is_checked_as_it_is_built_and_its_codes_as_they_are_decoded():
    import dataclasses  # noqa: PLC0415

    with pytest.raises(ValueError, match=r"not video: leave out the quantizer's dynamic field"):
        tiny_dynamic("video")  # refused before any training, not at its first encode
    for dynamic, named in [({"target_fine_ratio": "0.3"}, r"target_fine_ratio='0.3' \(str\) should be float"),
                           ({"hidden": 2.5}, r"hidden=2.5 \(float\) should be int"),
                           ({"calibrate": "no"}, r"calibrate='no' \(str\) should be bool"),
                           ({"fine_ratio": 0.3}, r"unknown DynamicQuantizer options \['fine_ratio'\]")]:
        with pytest.raises(ValueError, match=named):
            QuantizerConfig("vq", {"codebook_size": 32}, dynamic=dynamic)
    tok = tiny_dynamic("image").eval()
    assert tok.num_codebooks == 1 and tiny_dynamic("image", levels=2).num_codebooks == 2
    packed = tok.encode(torch.rand(1, 3, 32, 48) * 2 - 1)
    for field, value, named in [("codes", packed.codes[:, None], r"codes are \(\d+, 1\)"),
                                ("offsets", packed.offsets.tolist(), "not integer tensors: offsets"),
                                ("offsets", packed.offsets.float(), "not integer tensors: offsets"),
                                ("positions", packed.positions.float(), "not integer tensors: positions")]:
        with pytest.raises(ValueError, match=named):
            tok.decode(dataclasses.replace(packed, **{field: value}))
    assert tok.decode(packed).shape == (1, 3, 32, 48)
