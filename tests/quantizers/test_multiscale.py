"""VAR's multi-scale residual quantizer: maps of the stated sizes, compact maps that
spread back to the codes, finer scales that reduce the error, and an image bottleneck."""

from __future__ import annotations

import pytest
import torch

from tokenizers_vq import QuantizerConfig, Tokenizer, TokenizerConfig
from tokenizers_vq.quantizers import MultiScaleResidualQuantizer
from tokenizers_vq.quantizers.multiscale import _gather


def test_scale_maps_spread_back_to_the_codes_and_refine_the_latent():
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(8, 128, scales=(1, 2, 3, 6, 10))
    z = torch.randn(2, 10, 7, 8)
    for _ in range(3):  # k-means init and a few EMA steps on this latent
        q.train()(z)
    q.eval()
    codes = q.encode(z)
    maps = q.scale_codes(codes)
    assert [tuple(m.shape[1:]) for m in maps] == [(1, 1), (2, 1), (3, 2), (6, 4), (10, 7)]
    for k, m in enumerate(maps):  # the nearest-cell spread of each compact map is the codes' entry k
        n, g = (10, 7), m.shape[1:]
        spread = _gather(m, [torch.arange(a) * b // a for a, b in zip(n, g)])
        assert torch.equal(spread, codes[..., k])
    errors = []
    for k in range(1, len(q.scales) + 1):  # error of the sum of the first k scales
        f = sum(q._up(q.vq.decode(c).movedim(-1, 1), (10, 7)) for c in maps[:k])
        errors.append(float((f - z).square().mean()))
    assert errors[-1] < 0.85 * errors[0]  # the finer scales take off what the coarse ones left


def test_multiscale_is_an_image_bottleneck_by_name():
    cfg = TokenizerConfig("image", {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "latent_dim": 8},
                          QuantizerConfig("multiscale", {"codebook_size": 64, "scales": [1, 2, 4, 8]}))
    tok = Tokenizer(cfg).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (1, 8, 8, 4) and tok.num_codebooks == 4
    assert tok.decode(codes).shape == x.shape


def test_rates_count_the_scale_maps_and_misuse_is_refused():
    from tokenizers_vq import FSQ, GroupedQuantizer, ResidualQuantizer, VectorQuantizer
    from tokenizers_vq.quantizers import DynamicQuantizer

    q = MultiScaleResidualQuantizer(8, 64, scales=(1, 2, 4, 8))
    assert q.num_tokens((8, 8)) == 1 + 4 + 16 + 64 and VectorQuantizer(8, 64).num_tokens((8, 8)) == 64
    cfg = TokenizerConfig("image", {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "latent_dim": 8},
                          QuantizerConfig("multiscale", {"codebook_size": 64, "scales": [1, 2, 4, 8]}))
    assert Tokenizer(cfg).tokens_per_unit() * 16 * 16 == pytest.approx(85)  # not 8 x 8 x 4 = 256
    assert not GroupedQuantizer([q, MultiScaleResidualQuantizer(8, 64, scales=(1, 2, 4, 8))]).positionwise
    assert ResidualQuantizer([FSQ(8, [5, 5]), FSQ(8, [5, 5])]).positionwise
    with pytest.raises(ValueError, match="with their neighbours"):
        Tokenizer(TokenizerConfig("audio", {"channels": 4, "strides": [2, 4], "latent_dim": 8, "decoder_dim": 16,
                                            "decoder_layers": 1}, QuantizerConfig("multiscale", {"codebook_size": 16})))
    with pytest.raises(ValueError, match="use a position-wise one"):
        DynamicQuantizer(q)
    big = FSQ(2, [1001, 4096]).eval()  # a tanh bound overshoots half a step from L = 1001: clamped
    digits = big.codes_to_digits(big.encode(torch.randn(5000, 2) * 50))
    assert digits.min() >= 0 and digits[:, 0].max() == 1000 and digits[:, 1].max() == 4095


def test_codes_with_no_or_too_many_position_axes_are_refused():
    q = MultiScaleResidualQuantizer(8, 64, scales=(1, 2, 4))
    for shape in ((1, 3), (1, 2, 2, 2, 2, 3)):
        with pytest.raises(ValueError, match="at least one spatial axis and at most 3"):
            q.decode(torch.zeros(*shape, dtype=torch.long))


@pytest.mark.parametrize("kmeans_init", [False, True])
def test_first_step_keeps_the_shared_codebook_distinct(kmeans_init):
    # the codebook learns from every scale's rows at once: the 1x1 map has one row per item,
    # and restarts (or a k-means) drawn from it alone would make most codewords copies of 8 rows
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(16, 512, scales=(1, 2, 4, 8, 16), vq_options={"kmeans_init": kmeans_init}).train()
    out = q(torch.randn(8, 16, 16, 16))
    distinct = torch.unique(q.vq.codebook.round(decimals=5), dim=0).shape[0]
    assert distinct >= 480, distinct
    assert {"restarted", "skipped"} <= out.metrics.keys()  # one update for the step, not one per scale
    assert not any(k.startswith("restarted_scale") for k in out.metrics)
    q.eval()
    assert q.encode(torch.randn(8, 16, 16, 16)).unique().numel() >= 400


def test_the_shared_codebook_k_means_runs_in_fp32_under_autocast():
    z = torch.randn(4, 8, 8, 16)
    centres = []
    for on in (False, True):
        torch.manual_seed(0)
        q = MultiScaleResidualQuantizer(16, 64, scales=(1, 2, 4, 8), vq_options={"kmeans_init": True}).train()
        real = q.vq._kmeans
        q.vq._kmeans = lambda rows: (real(rows), centres.append(q.vq.codebook.clone()))  # its centres, before any step
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            q(z)
    torch.testing.assert_close(centres[0], centres[1], rtol=1e-5, atol=1e-6)  # (up to 0.95 apart in bf16)


@pytest.mark.parametrize("wrap", [{"groups": 2}, {"levels": 2}])
def test_groups_and_levels_of_scale_maps_count_each_part_s_tokens(wrap):
    """Two multi-scale parts of 1 + 4 + 16 + 64 tokens each over an 8 x 8 latent: 170, not 2 x 64 x 4."""
    q = QuantizerConfig("multiscale", {"codebook_size": 64, "scales": [1, 2, 4, 8]}, **wrap).build(16)
    assert q.num_tokens((8, 8)) == 2 * 85


def test_a_hierarchy_over_scale_maps_counts_each_level_s_tokens():
    from tokenizers_vq.quantizers import HierarchicalQuantizer  # noqa: PLC0415

    hq = HierarchicalQuantizer(*(MultiScaleResidualQuantizer(8, 64, scales=(1, 2, 4, 8)) for _ in range(2)))
    assert hq.num_tokens((8, 8)) == (1 + 1 + 4 + 16) + (1 + 4 + 16 + 64)  # the top's maps over the 4 x 4 coarse grid
