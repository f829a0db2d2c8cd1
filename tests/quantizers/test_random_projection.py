"""BEST-RQ targets: fixed by the seed, the argmax cosine of the normalised projection,
blind to a feature vector's offset and scale, and untouched by training."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
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


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT",
                    reason="this CPU runs the scalar kernel already: no other kernel to compare with")
def test_a_seed_gives_the_same_codebook_bits_on_every_cpu_kernel():
    """torch.randn draws other values under the scalar CPU kernel than under AVX2/AVX512 (an ulp
    in most rows): the codebook, built from torch.rand, must not. A process forced onto the
    scalar kernel builds the bits this one builds on its own (vector) kernel."""
    script = ("import hashlib; from tokenizers_vq.quantizers import RandomProjectionQuantizer as R; "
              "q = R(80, 1024, 16, seed=3); print(hashlib.sha256(q.codebook.numpy().tobytes()).hexdigest())")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    scalar = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    q = RandomProjectionQuantizer(80, 1024, 16, seed=3)
    assert scalar.stdout.strip() == hashlib.sha256(q.codebook.numpy().tobytes()).hexdigest()
    assert torch.isfinite(q.codebook).all()
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(1024))
    assert abs(float(q.codebook.mean())) < 0.01  # directions spread evenly over the sphere
