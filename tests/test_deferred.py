"""Deferred NaN/Inf checks: outside a block they raise at once; inside one they raise, with
the same words, when the caller asks; a quantizer in training mode never defers (its
statistics must not take a NaN): only ``encode`` defers."""

from __future__ import annotations

import pytest
import torch
from test_tokenizer import tiny

from tokenizers_vq.deferred import deferred_checks
from tokenizers_vq.quantizers import VectorQuantizer


def test_a_nan_input_raises_at_once_outside_and_when_asked_inside():
    tok = tiny("image")
    x = torch.rand(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="image input contains NaN or Inf"):
        tok.encode(x)
    with deferred_checks() as checks:
        codes = tok.encode(x)  # queued, not raised
    assert codes.shape[0] == 1
    with pytest.raises(ValueError, match="image input contains NaN or Inf"):
        checks.raise_if_failed()
    checks.raise_if_failed()  # each check is raised once
    with deferred_checks() as checks:
        tok.encode(torch.rand(1, 3, 32, 32))
    checks.raise_if_failed()  # a clean batch passes


def test_a_quantizer_defers_its_latent_check_in_encode_only():
    q = VectorQuantizer(dim=4, codebook_size=8)
    z = torch.randn(2, 5, 4)
    z[1, 2, 0] = 1e30
    with deferred_checks() as checks:
        q.encode(z)
    with pytest.raises(ValueError, match="magnitude 1e\\+30, over the limit"):
        checks.raise_if_failed()
    before = q.embed.clone()
    z[1, 2, 0] = float("nan")
    with deferred_checks(), pytest.raises(ValueError, match="NaN or Inf"):
        q.train()(z)  # a forward pass: raised before any statistics update
    assert torch.equal(q.embed, before)
