"""IBQ's point: the index's gradient reaches every codeword through the softmax."""

from __future__ import annotations

import pytest
import torch

from tokenizers_vq.quantizers import IBQ


def test_every_codeword_gets_a_gradient_and_eval_gives_the_codeword():
    torch.manual_seed(0)
    q = IBQ(16, 512).train()
    z = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = q(z)
    assert out.codes.unique().numel() <= 8
    (out.quantized.square().mean() + out.total_loss()).backward()
    assert bool((q.embed.grad.abs().sum(-1) > 0).all())  # all 512 rows, not only the <= 8 used
    assert z.grad is not None and z.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        e = q(z)
    assert torch.equal(e.quantized, q.embed[e.codes])  # exactly the codewords (no projection here)
    assert torch.equal(e.codes, (z @ q.embed.T).argmax(-1))


def test_a_vanishing_temperature_is_refused_and_the_smallest_keeps_the_entropy_finite():
    """A temperature of 1e-40 turns the scaled logits into Inf (a NaN entropy loss); 1e-20, the
    smallest accepted, keeps the loss and its gradients finite up to the largest latent accepted."""
    for temperature in (1e-40, 0.0, 9e-21):
        with pytest.raises(ValueError, match=r"temperature must be a number in \[1e-20, inf\)"):
            IBQ(8, 16, temperature=temperature)
    q = IBQ(8, 16, temperature=1e-20).train()
    for scale in (1.0, 1e15):
        z = (torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(0)) * scale).clamp(-1e15, 1e15)
        out = q(z)
        out.losses["entropy"].backward()
        assert torch.isfinite(out.losses["entropy"]) and torch.isfinite(q.embed.grad).all()
