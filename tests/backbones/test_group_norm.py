"""The backbones' GroupNorm on the CPU: the same output for an item alone or in a batch and,
in fp32 on channels-last activations (the image encoder's layout there), for any thread
count, where PyTorch's own kernel splits its sums by thread; and so the shipped image
encoder's latents of a real photo, bit for bit."""

from __future__ import annotations

import pytest
import torch

from testdata import shared_path

from tokenizers_vq.backbones._blocks import GroupNorm
from tokenizers_vq.media import load_image
from tokenizers_vq.tokenizer import Tokenizer


def _channels_last(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2 + 0.5).contiguous(memory_format=torch.channels_last)


def _norm(groups: int, channels: int) -> GroupNorm:
    m = GroupNorm(groups, channels, eps=1e-6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        m.weight.copy_(torch.randn(channels, generator=g))
        m.bias.copy_(torch.randn(channels, generator=g))
    return m


@pytest.mark.parametrize("shape", [(1, 64, 160, 240), (2, 12, 5, 700), (3, 8, 17, 9)])
def test_fp32_channels_last_output_is_the_same_for_any_thread_count(shape):
    m, x = _norm(min(32, shape[1] // 2), shape[1]), _channels_last(*shape)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(m(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.group_norm(x.double(), m.num_groups, m.weight.double(), m.bias.double(), m.eps)
    torch.testing.assert_close(outs[0].double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_item_is_normalised_as_it_is_alone_whatever_its_batch(dtype):
    m, x = _norm(4, 16).to(dtype), _channels_last(5, 16, 24, 40, seed=2).to(dtype)
    with torch.no_grad():
        together = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(5)])
    assert torch.equal(together, alone)


def test_gradients_flow_through_the_fixed_order_statistics():
    m, x = _norm(2, 8), _channels_last(2, 8, 6, 7, seed=3).requires_grad_()
    m(x).square().sum().backward()
    ref_x = x.detach().double().requires_grad_()
    ref_w, ref_b = m.weight.detach().double().requires_grad_(), m.bias.detach().double().requires_grad_()
    torch.nn.functional.group_norm(ref_x, 2, ref_w, ref_b, m.eps).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.weight.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bias.grad.double(), ref_b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("mean", "spread"), [(100.0, 0.1), (0.0, 1.0)])
def test_without_affine_and_with_a_mean_far_above_the_spread(mean, spread):
    m = GroupNorm(4, 16, eps=1e-6, affine=False)
    x = (_channels_last(1, 16, 40, 30, seed=4) * spread + mean).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.group_norm(x.double(), 4, eps=1e-6)
    torch.testing.assert_close(m(x).double(), ref, rtol=0, atol=1e-3)  # PyTorch's own channels-last kernel: ~0.05


def test_image_encoder_latents_of_a_photo_do_not_depend_on_the_thread_count():
    photo = load_image(shared_path("images", "bsds500", "val", "14037.jpg"))  # a token of it flipped before
    tok = Tokenizer.from_pretrained("image").eval()
    x = tok._pad(photo[None] * 2 - 1)
    before, latents = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                latents.append(tok.encoder(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(latents[0], latents[1])


@pytest.mark.parametrize("shape", [(1, 16, 1, 1), (1, 16, 1, 1, 1), (3, 16, 1, 1)])
def test_one_value_a_group_gives_the_bias_for_one_item_as_for_a_batch(shape):
    """A narrow model's 1 x 1 latent leaves one value in each group: normalised to 0, then the
    bias, for one item too (torch refuses one item of it, "more than 1 value per channel when
    training", in eval mode as well) and with its gradient, 0, as torch gives a batch."""
    m = _norm(16, 16).eval()
    x = torch.randn(*shape, requires_grad=True)
    out = m(x)
    bias = m.bias.view(1, -1, *[1] * (len(shape) - 2)).expand(shape)
    assert torch.equal(out.detach(), bias.detach())
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(shape))
    pair = torch.randn(2, *shape[1:])
    batched = torch.nn.functional.group_norm(pair, 16, m.weight, m.bias, 1e-6)[:1]  # (its variance rounds off 0)
    torch.testing.assert_close(m(pair[:1]), batched, atol=1e-3, rtol=0)
    assert m(torch.full(shape, float("nan"))).isnan().all()


def test_an_empty_batch_and_a_wrong_channel_count_are_torch_s_answers():
    m = _norm(16, 16).eval()
    assert m(torch.zeros(0, 16, 1, 1)).shape == (0, 16, 1, 1)
    with pytest.raises(RuntimeError):
        m(torch.zeros(1, 32, 1, 1))  # torch's own message, not a broadcast inside the one-value path
