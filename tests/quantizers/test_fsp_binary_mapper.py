"""FSP's bins, perturbation and moments loss; the binary mapper's bits, gradient and KL loss."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizers_vq.quantizers import FSP, BinaryMapper


def test_fsp_codes_are_the_cdf_bins_and_the_decoder_gets_standardised_midpoints():
    q = FSP(2, [4, 3]).eval()
    # tanh's CDF (tanh(x) + 1) / 2: p = 0.1 -> bin 0 of 4, p = 0.9 -> bin 2 of 3
    x = torch.atanh(torch.tensor([[0.1, 0.9]]) * 2 - 1)
    out = q(x[None])
    assert out.codes.item() == 0 + 2 * 4  # mixed radix, first channel fastest
    mid = torch.tensor([0.5 / 4, 2.5 / 3])
    torch.testing.assert_close(out.quantized[0, 0], (mid - 0.5) * math.sqrt(12))
    torch.testing.assert_close(q.decode(out.codes), out.quantized)
    inverse = FSP(2, [4, 3], inverse_cdf=True).eval()
    torch.testing.assert_close(inverse(x[None]).quantized[0, 0], torch.atanh(2 * mid - 1))


def test_fsp_perturbs_within_half_a_bin_in_training_with_the_cdfs_gradient():
    torch.manual_seed(0)
    q = FSP(3, [8, 5, 5]).train()
    x = torch.randn(1, 4000, 3, requires_grad=True)
    out = q(x)
    p = (torch.tanh(x.detach()) + 1) / 2
    v = out.quantized.detach() / math.sqrt(12) + 0.5
    half_bin = 0.5 / torch.tensor([8.0, 5.0, 5.0])
    assert ((v - p).abs() <= half_bin + 1e-6).all()
    assert (v - p).abs().mean() > 0.2 * half_bin.mean()  # moved: neither the CDF value nor (all) the midpoints
    mid = (torch.floor(p * torch.tensor([8.0, 5.0, 5.0])) + 0.5) / torch.tensor([8.0, 5.0, 5.0])
    assert not torch.allclose(v, mid, atol=1e-4)
    out.quantized.sum().backward()
    expected = math.sqrt(12) * (1 - torch.tanh(x.detach()) ** 2) / 2  # d/dx of (p - 1/2) sqrt(12)
    torch.testing.assert_close(x.grad, expected)
    q.eval()
    assert torch.equal(q(x.detach()).codes, out.codes)  # the codes are the bins, perturbed or not


def test_fsp_moments_loss_is_small_on_the_cdfs_own_distribution_which_fills_the_bins_evenly():
    torch.manual_seed(0)
    q = FSP(2, [8, 8]).eval()
    u = torch.rand(1, 200_000, 2).clamp(1e-6, 1 - 1e-6)
    logistic = torch.log(u / (1 - u)) / 2  # scale 1/2: tanh's CDF is its CDF
    out = q(logistic)
    assert out.losses["moments"] < 1e-4
    counts = torch.bincount(out.codes.flatten(), minlength=64).float()
    assert counts.min() / counts.max() > 0.9
    wide = q(logistic * 5)
    assert wide.losses["moments"] > 100 * out.losses["moments"] and wide.losses["moments"] > 0.07 * 10
    assert wide.metrics["perplexity"] < out.metrics["perplexity"]


def test_fsp_settings_kept_with_the_weights_and_bad_ones_named():
    saved = FSP(4, [5, 5, 5, 5], cdf="normal").state_dict()
    with pytest.raises(ValueError, match="saved with cdf 'normal' cannot load into a FSP with cdf 'tanh'"):
        FSP(4, [5, 5, 5, 5]).load_state_dict(saved)
    with pytest.raises(ValueError, match="saved with levels"):
        FSP(4, [5, 5, 5, 6], cdf="normal").load_state_dict(saved)
    with pytest.raises(ValueError, match="cauchy distribution has no variance.*var_weight=0"):
        FSP(4, [5, 5], cdf="cauchy", var_weight=0.07)
    assert FSP(4, [5, 5], cdf="cauchy").var_weight == 0  # its default: the mean term only
    inverse = FSP(4, [5, 5, 5, 5], inverse_cdf=True).state_dict()
    with pytest.raises(ValueError, match="saved with inverse_cdf True cannot load into a FSP with inverse_cdf False"):
        FSP(4, [5, 5, 5, 5]).load_state_dict(inverse)
    with pytest.raises(ValueError, match="does not fit int64 codes"):
        FSP(3, [2**24] * 3)
    with pytest.raises(ValueError, match="cdf must be one of"):
        FSP(4, [5, 5], cdf="gumbel")
    with pytest.raises(ValueError, match="levels must be a non-empty list"):
        FSP(4, [])
    assert FSP(4, torch.tensor([5, 4])).codebook_size == 20  # any sequence of whole numbers, as FSQ takes


def test_fsp_of_one_position_has_no_variance_term():
    q = FSP(2, [4, 4], mean_weight=0.0)
    out = q(torch.randn(1, 1, 2))
    assert out.losses["moments"] == 0 and torch.isfinite(out.quantized).all()


def test_binary_mapper_codes_are_the_signs_of_the_logits_read_in_binary():
    q = BinaryMapper(3, 3).eval()
    with torch.no_grad():
        q.project_in.weight.copy_(torch.eye(3))
        q.project_in.bias.zero_()
    z = torch.tensor([[[1.0, -2.0, 3.0], [-1.0, 2.0, -3.0]]])
    out = q(z)
    assert out.codes.tolist() == [[1 + 4, 2]]
    torch.testing.assert_close(out.quantized[0], q.embed[[5, 2]].detach())
    assert torch.equal(q.encode(z), out.codes)


def test_binary_mapper_samples_bits_in_training():
    torch.manual_seed(0)
    q = BinaryMapper(2, 4).train()
    with torch.no_grad():
        q.project_in.weight.zero_()
        q.project_in.bias.zero_()  # every bit a fair coin
    codes = q(torch.randn(1, 16000, 2)).codes
    counts = torch.bincount(codes.flatten(), minlength=16).float()
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000
    with torch.no_grad():
        q.project_in.bias.copy_(torch.tensor([60.0, -60.0, 60.0, 60.0]))  # certain bits: the eval code
    assert (q(torch.randn(1, 100, 2)).codes == 1 + 4 + 8).all()


def test_binary_mapper_gradient_is_that_of_the_tables_expectation():
    q = BinaryMapper(1, 1).train()
    with torch.no_grad():
        q.project_in.weight.fill_(1.0)
        q.project_in.bias.zero_()
        q.embed.copy_(torch.tensor([[0.0], [3.0]]))
    z = torch.full((1, 1, 1), 0.4, requires_grad=True)
    out = q(z)
    out.quantized.sum().backward()
    p = torch.sigmoid(torch.tensor(0.4))
    torch.testing.assert_close(z.grad.flatten(), (p * (1 - p) * 3.0).reshape(1))  # d/dz of (1 - p) e0 + p e1
    chosen = torch.zeros(2, 1)
    chosen[out.codes.item()] = 1.0
    torch.testing.assert_close(q.embed.grad, chosen)  # the table: its chosen row only, as a one-hot input gives


def test_binary_mapper_trains_with_half_precision_weights_and_a_low_temperature_samples_the_signs():
    torch.manual_seed(0)
    q = BinaryMapper(4, 6, temperature=1e-4).to(torch.bfloat16).train()
    z = torch.randn(2, 50, 4, dtype=torch.bfloat16)
    out = q(z)
    out.quantized.float().sum().backward()
    assert q.project_in.weight.grad is not None and torch.isfinite(q.project_in.weight.grad.float()).all()
    assert torch.equal(out.codes, q.eval()(z).codes)  # at temperature near 0 a bit is its logit's sign


def test_binary_mapper_kl_loss_is_zero_for_uniform_bits_and_hinged_at_one_bit():
    q = BinaryMapper(2, 5, kl_weight=2.0).eval()
    with torch.no_grad():
        q.project_in.weight.zero_()
        q.project_in.bias.zero_()
    assert q(torch.randn(1, 10, 2)).losses["kl"] == 0
    with torch.no_grad():
        q.project_in.bias.fill_(40.0)  # certain bits: KL = 5 ln 2, one bit of it free
    torch.testing.assert_close(q(torch.randn(1, 10, 2)).losses["kl"], torch.tensor(2.0 * 4 * math.log(2)))
    with pytest.raises(ValueError, match="bits must be a whole number in \\[1, 16\\], got 17: .*GroupedQuantizer"):
        BinaryMapper(2, 17)


def test_fsp_gives_the_reference_implementations_codes_and_values():
    vqp = pytest.importorskip("vector_quantize_pytorch", reason="the peer is not installed")
    if not hasattr(vqp, "FSP"):
        pytest.skip("the installed vector-quantize-pytorch predates FSP (1.34)")
    torch.manual_seed(0)
    ours, theirs = FSP(16, [8, 5, 5, 5]).eval(), vqp.FSP(levels=[8, 5, 5, 5], dim=16).eval()
    ours.project_in.load_state_dict(theirs.project_in.state_dict())
    ours.project_out.load_state_dict(theirs.project_out.state_dict())
    z = torch.randn(2, 64, 16) * 2
    out = ours(z)
    q, idx, loss, _ = theirs(z)
    assert torch.equal(out.codes, idx.long())
    torch.testing.assert_close(out.quantized, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.losses["moments"], loss, atol=1e-4, rtol=1e-3)  # its 0.8225 against pi^2/12
