"""IBQ's point: the index's gradient reaches every codeword through the softmax."""

from __future__ import annotations

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
