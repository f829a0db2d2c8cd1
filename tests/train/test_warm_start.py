"""Warm starts without training: what each ``init_quantizer`` mode takes when the decoder grows,
and depths spelled two ways."""

from __future__ import annotations

import pytest
import torch
from test_tokenizer import TINY

from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokenizer_config import QuantizerConfig, TokenizerConfig, filled_config
from tokenizers_vq.train.warm_start import warm_start


def video(backbone_extra: dict | None = None, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    cfg = TokenizerConfig("video", {**TINY["video"], **(backbone_extra or {})}, QuantizerConfig("fsq", {"levels": [5, 5, 5]}))
    return Tokenizer(cfg).eval()


@pytest.mark.parametrize("mode", ["all", "none"])
def test_a_grown_decoder_reconstructs_as_the_source_with_or_without_its_quantizer(tmp_path, mode):
    src = video(seed=1)
    src.save_pretrained(tmp_path / "src")
    deep = video({"decoder_res_blocks": 3})
    warm_start(deep, str(tmp_path / "src"), mode)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        z = src.encoder(x)
        torch.testing.assert_close(deep.decoder(z), src.decoder(z), rtol=0, atol=0)
        if mode == "all":  # the quantizer's projections too
            torch.testing.assert_close(deep(x).reconstruction, src(x).reconstruction)
    for mine, theirs in zip(deep.encoder.parameters(), src.encoder.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_the_same_depth_spelled_two_ways_is_one_config(tmp_path):
    src = video({"decoder_res_blocks": TINY["video"]["num_res_blocks"]}, seed=1)  # written out
    src.save_pretrained(tmp_path / "src")
    plain = video()  # decoder_res_blocks 0: num_res_blocks
    warm_start(plain, str(tmp_path / "src"))
    for mine, theirs in zip(plain.parameters(), src.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    shallow = video()
    shallow.save_pretrained(tmp_path / "shallow")
    deeper = video({"decoder_res_blocks": 2})
    deeper.save_pretrained(tmp_path / "deeper")
    with pytest.raises(ValueError, match="differs from this run's \\(model.backbone.decoder_res_blocks"):  # never shallower
        warm_start(shallow, str(tmp_path / "deeper"))


def test_a_source_that_leaves_defaults_out_fits_a_run_that_writes_them_out(tmp_path):
    torch.manual_seed(1)
    bare = {"channels": 8, "channel_mult": [1, 2, 2], "latent_dim": 8}  # the backbone's and the VQ's other defaults
    src = Tokenizer(TokenizerConfig("image", bare, QuantizerConfig("vq", {"codebook_size": 32}))).eval()
    src.save_pretrained(tmp_path / "src")
    full = filled_config(src.config)  # every default written out, as a config file may spell them
    assert set(full["backbone"]) > set(bare) and "metric" in full["quantizer"]["options"]
    spelled = Tokenizer(TokenizerConfig("image", full["backbone"], QuantizerConfig("vq", full["quantizer"]["options"])))
    warm_start(spelled, str(tmp_path / "src"))
    for mine, theirs in zip(spelled.parameters(), src.parameters(), strict=True):
        assert torch.equal(mine, theirs)
