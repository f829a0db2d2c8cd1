"""Deferred checks: outside a block they raise at once; inside one they raise, with the same
words, when the caller asks; a quantizer in training mode never defers (its statistics must
not take a NaN): only ``encode`` (and the range check of ``decode``) defers. A tokenizer's
``encode`` and ``decode`` read values on the host only once all their work is queued."""

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


@pytest.fixture
def host_reads(monkeypatch):
    """A list that gets ``"read"`` each time a tensor's value is read on the host (what waits
    for a GPU's queue); tests add their own marks between."""
    events: list[str] = []
    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        method = getattr(torch.Tensor, name)

        def read(self, *args, _method=method, **kwargs):
            events.append("read")
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return events


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_encode_and_decode_read_values_only_after_all_their_work(modality, host_reads):
    tok = tiny(modality)
    x = {"image": torch.rand(2, 3, 32, 32), "audio": torch.rand(2, 1, 800),
         "video": torch.rand(1, 3, 5, 32, 32)}[modality] * 2 - 1
    tok.encoder.register_forward_hook(lambda *_: host_reads.append("encoder"))
    tok.decoder.register_forward_hook(lambda *_: host_reads.append("decoder"))
    codes = tok.encode(x)
    assert "read" in host_reads  # the input and latent checks ran,
    assert "read" not in host_reads[: host_reads.index("encoder") + 1]  # after the encoder, not before it
    host_reads.clear()
    tok.decode(codes)
    assert "read" in host_reads and "read" not in host_reads[: host_reads.index("decoder") + 1]


def test_out_of_range_codes_are_refused_in_the_same_words_after_a_clamped_lookup():
    tok = tiny("image")
    codes = tok.encode(torch.rand(1, 3, 32, 32))
    bad = codes.clone()
    bad[0, 0, 0] = tok.quantizer.codebook_size  # one past the end
    with pytest.raises(ValueError, match=rf"codes out of range: found values in \[0, {tok.quantizer.codebook_size}\]"):
        tok.decode(bad)
    with pytest.raises(ValueError, match=r"codes out of range: found values in \[-1, "):
        tok.quantizer.decode(torch.where(codes == codes[0, 0, 0], -1, codes))  # outside a block: at once
    assert torch.equal(tok.decode(codes), tok.decode(codes))


def test_a_refused_input_is_the_error_reported_when_later_work_fails():
    from tokenizers_vq import deferred

    def refuse(_):
        raise ValueError("input refused")

    with pytest.raises(ValueError, match="input refused") as info, deferred.checked_at_end():
        deferred.check(torch.zeros(1), refuse)
        raise RuntimeError("what the refused values did later")
    assert isinstance(info.value.__context__, RuntimeError)
    with pytest.raises(RuntimeError, match="later"), deferred.checked_at_end():  # nothing queued failed
        deferred.check(torch.zeros(1), lambda _: None)
        raise RuntimeError("later")
    with deferred_checks() as outer:  # inside an outer block the checks stay queued there
        with deferred.checked_at_end():
            deferred.check(torch.zeros(1), refuse)
        with pytest.raises(ValueError, match="input refused"):
            outer.raise_if_failed()
