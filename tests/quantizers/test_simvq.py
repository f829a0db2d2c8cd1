"""SimVQ's point: one learned map moves every codeword, used or not."""

from __future__ import annotations

import pytest
import torch

from tokenizers_vq import QuantizerConfig, SimVQ, Tokenizer, TokenizerConfig, VectorQuantizer


def _step(q, z):
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    before = q.codebook.detach().clone()
    out = q(z)
    used = out.codes.unique()
    opt.zero_grad()
    (out.quantized.square().mean() + out.total_loss()).backward()
    opt.step()
    moved = (q.codebook.detach() - before).abs().sum(-1) > 0
    return used, moved


def test_one_step_moves_every_codeword_not_only_the_used_ones():
    z = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))  # 8 latents: at most 8 of 256 codes used
    torch.manual_seed(0)
    used, moved = _step(SimVQ(16, 256), z)
    assert used.numel() <= 8 and bool(moved.all())
    torch.manual_seed(0)
    used, moved = _step(VectorQuantizer(16, 256, learning="loss", kmeans_init=False, restart_dead_codes=False), z)
    assert int(moved.sum()) == used.numel()  # plain VQ: only the selected codewords learn


def test_map_init_linear_as_the_paper_or_orthogonal():
    torch.manual_seed(0)
    paper, rotation = SimVQ(16, 64), SimVQ(16, 64, map_init="orthogonal")
    w = rotation.map.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5)  # a rotation keeps the codewords' norms
    bound = 1 / 16**0.5  # nn.Linear's default: uniform in +-1/sqrt(d)
    assert float(paper.map.weight.detach().abs().max()) <= bound
    ratio = paper.codebook.detach().norm(dim=1) / paper.frozen_codebook.norm(dim=1)
    assert 0.3 < float(ratio.mean()) < 0.9  # shrinks the codebook by about 1/sqrt(3)
    with pytest.raises(ValueError, match="map_init"):
        SimVQ(16, 64, map_init="xavier")


def test_simvq_is_a_tokenizer_bottleneck_by_name():
    cfg = TokenizerConfig("image", {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "latent_dim": 8},
                          QuantizerConfig("simvq", {"codebook_size": 64}, levels=2))
    tok = Tokenizer(cfg).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (1, 8, 8, 2) and tok.num_codebooks == 2
    assert tok.decode(codes).shape == x.shape


def test_orthogonal_regulariser_spreads_a_learned_codebook():
    import pytest

    torch.manual_seed(0)
    q = VectorQuantizer(8, 16, learning="loss", orthogonal_weight=1.0, kmeans_init=False, restart_dead_codes=False)
    with torch.no_grad():
        q.embed.copy_(torch.randn(1, 8).repeat(16, 1) + 0.01 * torch.randn(16, 8))  # 16 near-parallel codewords
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    z = torch.randn(1, 32, 8)
    first = None
    for _ in range(100):
        out = q(z)
        first = first if first is not None else float(out.losses["orthogonal"])
        opt.zero_grad()
        out.losses["orthogonal"].backward()
        opt.step()
    assert float(q(z).losses["orthogonal"]) < 0.5 * first  # the codewords turn apart
    with pytest.raises(ValueError, match="learning='loss'"):
        VectorQuantizer(8, 16, orthogonal_weight=1.0)


def test_the_rotation_estimator_rotates_the_encoder_gradient_and_keeps_the_codes():
    z = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(2))
    grads, codes = {}, {}
    for est in ("ste", "rotation"):
        torch.manual_seed(0)
        q = SimVQ(16, 32, estimator=est)
        zz = z.clone().requires_grad_()
        out = q(zz)
        out.quantized.pow(2).sum().backward()
        grads[est], codes[est] = zz.grad, out.codes
    assert torch.equal(codes["ste"], codes["rotation"])
    assert not torch.allclose(grads["ste"], grads["rotation"])
    # the rotation trick keeps the gradient's length up to the scale |q| / |z| per row
    torch.manual_seed(0)
    q = SimVQ(16, 32)
    cb_rows = q.codebook[codes["ste"][0]].detach()
    scale = cb_rows.norm(dim=-1) / z[0].norm(dim=-1)
    torch.testing.assert_close(grads["rotation"][0].norm(dim=-1), grads["ste"][0].norm(dim=-1) * scale)
