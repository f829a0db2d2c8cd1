"""FSQ and LFQ/BSQ: value grids, index arithmetic, entropy penalty."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizers_vq import FSQ, LFQ


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4, 7], [6]])
def test_fsq_each_channel_takes_exactly_its_levels(levels):
    fsq = FSQ(len(levels), levels)
    z = torch.randn(20000, len(levels)) * 5
    out = fsq(z)
    digits = fsq.codes_to_digits(out.codes)
    for c, lv in enumerate(levels):
        assert set(digits[:, c].tolist()) == set(range(lv))
        values = out.quantized[:, c].unique()
        assert len(values) == lv and values.abs().max() <= 1.0
    # zero maps to the centre value, also with even levels (half-step offset)
    assert torch.equal(fsq(torch.zeros(1, len(levels))).quantized, torch.zeros(1, len(levels)))


def test_fsq_indices_are_mixed_radix_and_bijective():
    levels = [8, 5, 5, 5]
    fsq = FSQ(4, levels)
    all_codes = torch.arange(fsq.codebook_size)
    digits = fsq.codes_to_digits(all_codes)
    assert torch.equal(digits[:, 0] + 8 * digits[:, 1] + 40 * digits[:, 2] + 200 * digits[:, 3], all_codes)
    assert fsq.decode(all_codes).unique(dim=0).shape[0] == 1000


def test_fsq_huge_implicit_codebook_is_never_built():
    fsq = FSQ(64, [16] * 10)  # 2^40 codes
    assert fsq.codebook_size == 2**40
    out = fsq(torch.randn(4, 32, 64))
    assert "usage_batch" not in out.metrics
    assert int(out.codes.max()) < 2**40
    assert torch.equal(fsq.eval()(torch.ones(1, 64)).quantized, fsq.decode(fsq.encode(torch.ones(1, 64))))


def test_lfq_codes_are_sign_bits_and_bsq_lies_on_the_sphere():
    lfq = LFQ(12, 12)
    z = torch.randn(100, 12)
    out = lfq(z)
    assert torch.equal(out.quantized, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal((out.codes.unsqueeze(1) >> torch.arange(12)) & 1, (z > 0).long())
    bsq = LFQ(12, 12, spherical=True)
    torch.testing.assert_close(bsq(z).quantized.norm(dim=-1), torch.ones(100))


def test_lfq_supports_codebooks_beyond_2_18():
    lfq = LFQ(64, 40)
    out = lfq(torch.randn(2, 50, 64))
    assert lfq.codebook_size == 2**40 and int(out.codes.max()) < 2**40
    assert "entropy" in out.losses


def _brute_force_entropies(x: torch.Tensor, lfq: LFQ):
    n_bits = x.shape[1]
    bits = ((torch.arange(2**n_bits).unsqueeze(1) >> torch.arange(n_bits)) & 1).double()
    codes = (bits * 2 - 1) * lfq.scale
    p = (-(x.double().unsqueeze(1) - codes).pow(2).sum(-1) / lfq.temperature).softmax(-1)
    h = lambda q: -(q * q.clamp_min(1e-30).log()).sum(-1)  # noqa: E731
    return h(p).mean(), h(p.mean(0))


@pytest.mark.parametrize("group_bits", [1, 2, 4])
def test_lfq_group_factorised_entropy(group_bits):
    torch.manual_seed(0)
    x = torch.randn(256, 4) * 0.1
    lfq = LFQ(4, 4, group_bits=group_bits, temperature=0.05)
    sample_h, codebook_h = lfq._entropies(x)
    ref_sample, ref_codebook = _brute_force_entropies(x, lfq)
    # per-sample entropy factorises exactly over bits; the codebook entropy of the
    # factorised estimate is an upper bound, exact when one group holds all bits
    torch.testing.assert_close(sample_h.double(), ref_sample, rtol=1e-4, atol=1e-5)
    assert codebook_h >= ref_codebook - 1e-5
    if group_bits == 4:
        torch.testing.assert_close(codebook_h.double(), ref_codebook, rtol=1e-4, atol=1e-5)
    assert codebook_h <= 4 * math.log(2) + 1e-5


def test_lfq_entropy_penalty_spreads_codes():
    """Training a linear encoder on a constant-ish input with the entropy loss alone
    raises codebook usage: the penalty does what it is for."""
    torch.manual_seed(0)
    lfq = LFQ(8, 6, entropy_weight=1.0, temperature=0.1)
    enc = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam([*enc.parameters(), *lfq.parameters()], lr=1e-2)
    x = torch.randn(512, 8) * 0.1 + 1.0
    used0 = lfq(enc(x)).codes.unique().numel()
    for _ in range(200):
        out = lfq(enc(x))
        opt.zero_grad()
        out.losses["entropy"].backward()
        opt.step()
    used = lfq(enc(x)).codes.unique().numel()
    assert used > 4 * used0 and used >= 24  # 3 -> 31 of 64 codes when written


def test_fsq_weights_keep_their_grid_and_refuse_another():
    """Levels and bound travel with the weights: an FSQ of another grid refuses them (the codes
    would mean other values), and weights saved before the grid was kept still load."""
    saved = FSQ(4, [8, 5, 5, 5]).state_dict()
    assert saved["_levels"].tolist() == [8, 5, 5, 5]
    FSQ(4, [8, 5, 5, 5]).load_state_dict(saved)
    for other, said in ((FSQ(4, [5, 5, 5, 8]), r"levels \[8, 5, 5, 5\].*levels \[5, 5, 5, 8\]"),
                        (FSQ(4, [8, 5, 5, 5], bound="paper"), "bound 'tanh'.*bound 'paper'")):
        with pytest.raises(ValueError, match=said):
            other.load_state_dict(saved)
    older = {k: v for k, v in saved.items() if k not in ("_levels", "_bound")}
    FSQ(4, [8, 5, 5, 5]).load_state_dict(older)  # strict, and nothing missing


def test_the_embedded_video_model_loads_its_fsq_grid():
    from tokenizers_vq import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_pretrained("video")
    assert tok.quantizer.state_dict()["_levels"].tolist() == tok.quantizer.levels == [8, 8, 8, 5, 5, 5]


def test_lfq_and_multiscale_weights_keep_their_settings():
    from tokenizers_vq.quantizers import MultiScaleResidualQuantizer  # noqa: PLC0415

    with pytest.raises(ValueError, match="spherical False.*spherical True"):
        LFQ(8, 8, spherical=True).load_state_dict(LFQ(8, 8).state_dict())
    with pytest.raises(ValueError, match=r"scales \[1, 2, 4\].*scales \[1, 2, 3\]"):
        MultiScaleResidualQuantizer(8, 16, scales=(1, 2, 3)).load_state_dict(
            MultiScaleResidualQuantizer(8, 16, scales=(1, 2, 4)).state_dict())
    older = {k: v for k, v in LFQ(8, 8).state_dict().items() if k not in ("_num_bits", "_spherical")}
    LFQ(8, 8).load_state_dict(older)


def test_fsq_refuses_levels_past_float32_steps_and_keeps_codes_in_range_up_to_them():
    """The bounded values are float32: a channel of more than 2^24 levels would round two levels
    to one value and give codes past prod(levels); 2^24 itself still codes exactly."""
    with pytest.raises(ValueError, match=r"levels must each be at most 2\^24 = 16777216 .* got 33554432: split"):
        FSQ(2, [2**25, 2])
    fsq = FSQ(2, [2**24, 2]).eval()
    z = torch.tensor([[50.0, -50.0], [-50.0, 50.0], [0.3, 0.2]])
    codes = fsq.encode(z)
    assert int(codes.min()) >= 0 and int(codes.max()) < fsq.codebook_size
    assert fsq.codes_to_digits(codes)[:2].tolist() == [[2**24 - 1, 0], [0, 1]]
    assert torch.equal(fsq.decode(codes), fsq(z).quantized)


def test_fsq_codes_to_digits_refuses_codes_out_of_range_as_decode_does():
    fsq = FSQ(3, [4, 5, 6])  # 120 codes
    for bad in ([-1, 5], [0, 120]):
        with pytest.raises(ValueError, match=r"codes out of range: found values in \[.*\], valid range is \[0, 120\)"):
            fsq.codes_to_digits(torch.tensor(bad))
    assert fsq.codes_to_digits(torch.tensor(119)).tolist() == [3, 4, 5]  # a single code too
    assert fsq.codes_to_digits(torch.tensor([[0, 1]], dtype=torch.uint8)).tolist() == [[[0, 0, 0], [1, 0, 0]]]
    assert fsq.codes_to_digits(torch.zeros(0, 7, dtype=torch.long)).shape == (0, 7, 3)  # no codes, no digits


def test_lfq_refuses_a_vanishing_temperature_and_groups_too_large_to_build():
    """A temperature of 1e-40 turns the scaled logits into Inf (a NaN entropy loss); 1e-20, the
    smallest accepted, keeps the loss and its gradients finite up to the largest latent accepted."""
    for make in (lambda: LFQ(8, 8, temperature=1e-40), lambda: LFQ(8, 8, temperature=0.0)):
        with pytest.raises(ValueError, match=r"temperature must be a number in \[1e-20, inf\)"):
            make()
    z = (torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(0)) * 1e15).clamp(-1e15, 1e15)
    for lfq in (LFQ(8, 8, temperature=1e-20), LFQ(8, 8, temperature=1e-20, spherical=True)):
        z1 = z.clone().requires_grad_()
        out = lfq.train()(z1)
        out.losses["entropy"].backward()
        assert torch.isfinite(out.losses["entropy"]) and torch.isfinite(z1.grad).all()
    with pytest.raises(ValueError, match="group_bits=40 is over 16: .* pass a smaller divisor of num_bits"):
        LFQ(40, 40, group_bits=40)  # (2^40, 40) sub-codes: terabytes
    assert LFQ(16, 16, group_bits=16)._sub_codes.shape == (2**16, 16)
