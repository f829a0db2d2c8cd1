"""Deferred checks: outside a block they raise at once; inside one they raise, with the same
words, when the caller asks; a quantizer in training mode never defers (its statistics must
not take a NaN): only ``encode`` (and the range check of ``decode``) defers. A tokenizer's
``encode`` reads values on the host once, after all its work is queued; ``decode`` once, before."""

from __future__ import annotations

import threading

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
    """A list that gets ``"read"`` each time this thread reads a tensor's value on the host
    (what waits for a GPU's queue); tests add their own marks between."""
    events: list[str] = []
    me = threading.get_ident()
    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        method = getattr(torch.Tensor, name)

        def read(self, *args, _method=method, **kwargs):
            if threading.get_ident() == me:
                events.append("read")
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return events


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_encode_reads_values_once_after_all_its_work(modality, host_reads, monkeypatch):
    tok = tiny(modality)
    x = {"image": torch.rand(2, 3, 32, 32), "audio": torch.rand(2, 1, 800),
         "video": torch.rand(1, 3, 5, 32, 32)}[modality] * 2 - 1
    tok.encoder.register_forward_hook(lambda *_: host_reads.append("encoder"))
    search = tok.quantizer._codes

    def marked(z):  # the search itself may read values on the CPU (the exact reference does)
        host_reads.append("search")
        out = search(z)
        host_reads.append("searched")
        return out

    monkeypatch.setattr(tok.quantizer, "_codes", marked)
    tok.encode(x)
    last = len(host_reads) - host_reads[::-1].index("searched")
    before = [e for e in host_reads[: host_reads.index("search")] if e != "encoder"]
    assert before == []  # no wait before the model ran: not for the input check, nor the latent check,
    # which read their values together at the end: the input's, and each item's latent (the CPU codes items alone)
    assert host_reads[last:] == ["read"] * (1 + len(x))


def test_decode_reads_the_codes_range_once_and_never_after_the_decoder(host_reads):
    tok = tiny("image")
    codes = tok.encode(torch.rand(1, 3, 32, 32))
    tok.decoder.register_forward_hook(lambda *_: host_reads.append("decoder"))
    host_reads.clear()
    tok.decode(codes)
    assert host_reads == ["read", "decoder"]  # the decoder's work is left queued on return


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_out_of_range_codes_in_a_block_are_looked_up_clamped_then_refused_in_the_same_words(dtype):
    tok = tiny("image")
    k = tok.quantizer.codebook_size
    codes = tok.encode(torch.rand(1, 3, 32, 32)).to(dtype)
    bad = codes.long().clone()
    bad[0, 0, 0] = k + 5
    with pytest.raises(ValueError, match=rf"codes out of range: found values in \[0, {k + 5}\]"):
        tok.decode(bad)  # outside a block: at once
    with deferred_checks() as checks:
        got = tok.quantizer.decode(bad)  # queued: no IndexError, no device assert
        assert torch.equal(got, tok.quantizer.decode(bad.clamp(0, k - 1)))
        assert torch.equal(tok.quantizer.decode(codes), tok.quantizer.decode(codes.long()))  # valid ones as they are
    with pytest.raises(ValueError, match=rf"codes out of range: found values in \[0, {k + 5}\]"):
        checks.raise_if_failed()
    assert torch.equal(tok.decode(codes), tok.decode(codes.long()))  # small integer types decode


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
        with pytest.raises(ValueError, match="input refused"), deferred.checked_at_end():  # unless the block raises
            deferred.check(torch.zeros(1), refuse)
            raise RuntimeError("what the refused values did later")
        outer.raise_if_failed()  # its checks ran there, once
