"""Image backbone: shapes at f4 / f8 / f16, input checks, gradients, and a short
autoencoding run on a real photo."""

from __future__ import annotations

import pytest
import torch

from testdata import shared_path
from tokenizers_vq.backbones import ImageBackboneConfig, ImageDecoder, ImageEncoder
from tokenizers_vq.backbones.image import ResBlock, SelfAttention
from tokenizers_vq.media import load_image


def small(channel_mult=(1, 2, 2), **kw) -> ImageBackboneConfig:
    return ImageBackboneConfig(channels=8, channel_mult=channel_mult, num_res_blocks=1, latent_dim=12, **kw)


@pytest.mark.parametrize(
    ("channel_mult", "f"), [((1, 2, 2), 4), ((1, 1, 2, 4), 8), ((1, 1, 2, 2, 4), 16)]
)
@pytest.mark.parametrize(("h", "w"), [(32, 32), (48, 80), (96, 16)])
@pytest.mark.parametrize("attention", [True, False])
def test_shapes(channel_mult, f, h, w, attention):
    if h % f or w % f:
        pytest.skip("size not a multiple of f")
    cfg = small(channel_mult, attention=attention)
    assert cfg.downsample == f
    enc, dec = ImageEncoder(cfg), ImageDecoder(cfg)
    z = enc(torch.randn(2, 3, h, w))
    assert z.shape == (2, 12, h // f, w // f)
    assert dec(z).shape == (2, 3, h, w)


def test_default_config_is_f16():
    cfg = ImageBackboneConfig()
    assert cfg.downsample == 16
    assert ImageBackboneConfig(channel_mult=(1, 1, 2, 4)).downsample == 8


def test_greyscale_channels():
    cfg = small(in_channels=1)
    y = ImageDecoder(cfg)(ImageEncoder(cfg)(torch.randn(1, 1, 16, 24)))
    assert y.shape == (1, 1, 16, 24)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, 32, 32), "4 axes"),
        ((1, 4, 32, 32), "4 channels but this backbone expects 3"),
        ((1, 3, 30, 32), "image height 30 is not a multiple of the downsampling factor 4"),
        ((1, 3, 32, 18), "image width 18 is not a multiple of the downsampling factor 4"),
    ],
)
def test_encoder_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        ImageEncoder(small())(torch.zeros(shape))


def test_encoder_rejects_integer_images():
    with pytest.raises(ValueError, match="floating-point"):
        ImageEncoder(small())(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize(("shape", "match"), [((12, 4, 4), "4 axes"), ((1, 8, 4, 4), "8 channels")])
def test_decoder_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        ImageDecoder(small())(torch.zeros(shape))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="channel_mult"):
        ImageBackboneConfig(channel_mult=())
    with pytest.raises(ValueError, match="latent_dim"):
        ImageBackboneConfig(latent_dim=0)


def test_gradients_reach_input_and_last_layer():
    torch.manual_seed(0)
    cfg = small()
    enc, dec = ImageEncoder(cfg), ImageDecoder(cfg)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    dec(enc(x)).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert any(dec.last_layer is p for p in dec.parameters())
    assert dec.last_layer.grad is not None and dec.last_layer.grad.abs().sum() > 0


def test_few_adam_steps_reduce_mse_on_a_real_photo():
    torch.manual_seed(0)
    photo = sorted(shared_path("images", "bsds500", "train").glob("*.jpg"))[0]
    img = load_image(photo)  # (3, H, W) in [0, 1]
    top, left = (img.shape[1] - 64) // 2, (img.shape[2] - 64) // 2
    x = img[:, top : top + 64, left : left + 64].unsqueeze(0) * 2 - 1
    cfg = small()
    enc, dec = ImageEncoder(cfg), ImageDecoder(cfg)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=2e-3)
    losses = []
    for _ in range(40):
        loss = (dec(enc(x)) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"image MSE {losses[0]:.4f} -> {losses[-1]:.4f} (pixel variance {x.var().item():.4f})")
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < x.var().item()  # better than predicting the mean colour


@pytest.mark.parametrize(("c_in", "c_out"), [(16, 16), (16, 32)])
def test_a_residual_block_at_inference_gives_the_training_graph_values(c_in, c_out):
    torch.manual_seed(0)
    block = ResBlock(c_in, c_out).eval()
    x = torch.randn(1, c_in, 24, 40).contiguous(memory_format=torch.channels_last)
    y = block(x)  # with gradients: the plain sum
    assert y.requires_grad
    with torch.no_grad():
        # fp32: the fused sum to rounding (bit for bit on the AVX-512 machines measured; another
        # instruction set may pick another kernel for the convolution with a post-op)
        torch.testing.assert_close(block(x), y, rtol=1e-6, atol=1e-6)
        h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
        a = torch.nn.functional.silu(block.norm2(h))
        assert torch.equal(y, block.skip(x) + block.conv2(a))
        # bf16 (as under autocast with bf16 weights): the fused sum rounds once, the plain one twice
        b16, x16 = block.to(torch.bfloat16), x.bfloat16()
        fused = b16(x16)
        h16 = b16.conv1(torch.nn.functional.silu(b16.norm1(x16)))
        plain = b16.skip(x16) + b16.conv2(torch.nn.functional.silu(b16.norm2(h16)))
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("channels_last", [False, True])  # channels-last: the fused kernel's layout
@pytest.mark.parametrize("grad", [False, True])
def test_self_attention_equals_the_textbook_formula(grad, channels_last):
    torch.manual_seed(0)
    att = SelfAttention(32).eval()
    x = torch.randn(2, 32, 6, 10)
    if channels_last:
        att, x = att.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(grad):
        y = att(x)
        q, k, v = att.qkv(att.norm(x)).flatten(2).chunk(3, 1)  # (B, C, HW) each
        w = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, -1)  # (B, HW, HW)
        ref = x + att.proj((v @ w.transpose(1, 2)).view_as(x))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
