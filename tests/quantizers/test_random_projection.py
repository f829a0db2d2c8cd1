"""BEST-RQ targets: fixed by the seed, the argmax cosine of the normalised projection,
blind to a feature vector's offset and scale, and untouched by training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizers_vq.quantizers import RandomProjectionQuantizer


def test_targets_are_the_cosine_argmax_fixed_by_the_seed_and_scale_free():
    z = torch.randn(3, 50, 80)
    q = RandomProjectionQuantizer(80, 1024)
    codes = q.encode(z)
    x = F.layer_norm(z, (80,)) @ q.projection
    brute = (F.normalize(x, dim=-1) @ q.codebook.T).argmax(-1)
    assert (codes == brute).float().mean() > 0.999  # ties aside
    assert torch.equal(RandomProjectionQuantizer(80, 1024).encode(z), codes)  # same seed, same targets
    assert not torch.equal(RandomProjectionQuantizer(80, 1024, seed=1).encode(z), codes)
    assert torch.equal(q.encode(3 * z + 2), codes)  # each vector standardised first
    q.train()
    out = q(z)
    assert out.losses == {} and torch.equal(q.encode(z), codes)  # nothing learns
    assert out.metrics["usage_batch"] > 0.05
