"""The backbones' GroupNorm on the CPU: the same output for an item alone or in a batch and,
in fp32 on channels-last activations (the image encoder's layout there), for any thread
count, where PyTorch's own kernel splits its sums by thread."""

from __future__ import annotations

import pytest
import torch

from tokenizers_vq.backbones._blocks import GroupNorm


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
