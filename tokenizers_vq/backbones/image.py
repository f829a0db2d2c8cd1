"""VQGAN-style convolutional ResNet encoder and decoder for images (Esser et al.
2021, "Taming Transformers for High-Resolution Image Synthesis").

The encoder halves the resolution ``len(channel_mult) - 1`` times (f4 / f8 / f16);
the decoder mirrors it with nearest-neighbour upsampling followed by a conv.
Optional single-head self-attention runs at the lowest resolution only, where
the number of positions is smallest.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.backbones._blocks import PointwiseConv, check_input, check_multiple, check_positive, group_norm


@dataclass
class ImageBackboneConfig:
    """Shape of the image encoder / decoder pair.

    Attributes:
        in_channels: image channels ``C`` (3 for RGB).
        channels: base width; level ``i`` has ``channels * channel_mult[i]``.
        channel_mult: width multiplier per resolution level; there are
            ``len(channel_mult) - 1`` downsamplings, so ``(1, 2, 2)`` is f4,
            ``(1, 1, 2, 4)`` f8 and the default f16.
        num_res_blocks: residual blocks per level (the decoder uses the same).
        attention: add self-attention at the lowest resolution (encoder and decoder).
        latent_dim: channels of the latent the quantizer sees.
    """

    in_channels: int = 3
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attention: bool = True
    latent_dim: int = 256

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        for name in ("in_channels", "channels", "num_res_blocks", "latent_dim"):
            check_positive(name, getattr(self, name))
        check_positive("channel_mult", self.channel_mult)

    @property
    def downsample(self) -> int:
        """Spatial reduction factor ``f``: one latent position per ``f x f`` pixels."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def stride(self) -> tuple[int, int]:
        """Pixels per latent cell along ``(H, W)``."""
        return (self.downsample, self.downsample)


class ResBlock(nn.Module):
    """``(B, C_in, H, W) -> (B, C_out, H, W)``: two (GroupNorm, SiLU, 3x3 conv)
    layers plus a 1x1-projected skip when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return _conv_plus(self.conv2, F.silu(self.norm2(h)), self.skip(x))


# oneDNN's fused convolution ops are what Inductor uses on x86; elsewhere (Arm) the plain sum
_ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


def _conv_plus(conv: nn.Conv2d, x: Tensor, other: Tensor) -> Tensor:
    """``other + conv(x)``; at eager inference on the CPU in one oneDNN call whose binary-add
    post-op adds ``other`` to the convolution's output before it is stored (fp32: the same
    values, bit for bit where measured; bf16 rounds once instead of twice), which saves a
    pass over the largest activations of the block. Under ``torch.compile`` the plain sum
    (Inductor fuses it itself)."""
    fused = (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
             and _ONEDNN and torch.backends.mkldnn.enabled and not (conv._forward_hooks or conv._forward_pre_hooks)
             and x.dtype in (torch.float32, torch.bfloat16) and other.dtype == x.dtype
             and not (x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"))  # autocast would run it in bf16
             and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros")
    if not fused:
        return other + conv(x)
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, other, conv.weight.to(x.dtype), bias, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "add", None, None, [], None)


# PyTorch's fused CPU attention packs bf16 operands with AVX-512 code on a CPU with AMX, and
# fails there when ATEN_CPU_CAPABILITY lowers the dispatch below AVX-512: elsewhere the CPU
# keeps the three-axis layout (matmul + softmax)
_FUSED_CPU_ATTENTION = torch.backends.cpu.get_cpu_capability() == "AVX512"


class SelfAttention(nn.Module):
    """``(B, C, H, W) -> (B, C, H, W)``: pre-norm single-head attention over the
    ``H * W`` positions, added residually."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.qkv = PointwiseConv(c, 3 * c)
        self.proj = PointwiseConv(c, c)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # (B, 1, HW, C) each: one head, four axes, which the fused attention kernels need (three
        # axes always take the matmul + softmax path); channels-last activations (the CPU
        # encoder's) also give C a stride of 1, which they need too
        heads = (1,) if x.device.type != "cpu" or _FUSED_CPU_ATTENTION else ()
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, *heads, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, C, H, W) as a plain channels-last view: the transposed view's batch stride sent a
        # single image down a CPU convolution path whose sums depend on the thread count
        return x + self.proj(out.reshape(b, h, w, c).permute(0, 3, 1, 2))


class Downsample(nn.Module):
    """``(B, C, H, W) -> (B, C, H/2, W/2)``: a stride-2 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """``(B, C_in, H, W) -> (B, C_out, 2H, 2W)``: nearest-neighbour x2 then a 3x3
    conv (no transposed conv, which leaves checkerboard artefacts)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, num_blocks: int, attention: bool) -> list[nn.Module]:
    """``num_blocks`` ResBlocks (the first changes the width), with self-attention
    after the first one when ``attention``."""
    blocks: list[nn.Module] = [ResBlock(c_in, c_out)]
    if attention:
        blocks.append(SelfAttention(c_out))
    blocks += [ResBlock(c_out, c_out) for _ in range(num_blocks - 1)]
    return blocks


class ImageEncoder(nn.Module):
    """``(B, C, H, W)`` image in ``[-1, 1]`` ``-> (B, latent_dim, H/f, W/f)``.

    The default config (f16, ``channels=64``) has 4,214,656 parameters (4.21M);
    with the 4.73M of :class:`ImageDecoder` the pair has 8.94M (34 MiB in
    float32, 17 MiB in bfloat16). Without attention: 3.95M.

    Args:
        cfg: see :class:`ImageBackboneConfig`.

    Example:
        >>> enc = ImageEncoder(ImageBackboneConfig(channels=16, channel_mult=(1, 2, 2)))
        >>> enc(torch.zeros(1, 3, 32, 48)).shape
        torch.Size([1, 256, 8, 12])
    """

    def __init__(self, cfg: ImageBackboneConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        last = len(widths) - 1
        blocks: list[nn.Module] = []
        c = widths[0]
        for level, width in enumerate(widths):
            blocks += _level(c, width, cfg.num_res_blocks, cfg.attention and level == last)
            c = width
            if level < last:
                blocks.append(Downsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(c)
        # 1x1: a 3x3 here would hold ~9% of the default model's weights for little gain.
        self.conv_out = PointwiseConv(c, cfg.latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Encode images.

        Args:
            x: ``(B, C, H, W)`` in ``[-1, 1]``; ``H`` and ``W`` multiples of
                ``cfg.downsample``.

        Returns:
            ``(B, latent_dim, H / f, W / f)`` latents.

        Raises:
            ValueError: wrong rank or channel count, or a side not a multiple of ``f``.
        """
        check_input(x, what="image", layout="BCHW", channels=self.cfg.in_channels)
        f = self.cfg.downsample
        check_multiple(x.shape[2], f, what="image height", factor_name="the downsampling factor")
        check_multiple(x.shape[3], f, what="image width", factor_name="the downsampling factor")
        if x.device.type == "cpu":  # oneDNN's fast layout; the latents come out in the quantizer's (B, h, w, D) order
            x = x.contiguous(memory_format=torch.channels_last)  # (CUDA's GroupNorm would copy back to NCHW)
        h = self.blocks(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class ImageDecoder(nn.Module):
    """``(B, latent_dim, h, w) -> (B, C, h*f, w*f)``, unbounded (no tanh: the
    loss sees the raw output, clamp for display).

    The default config has 4,726,211 parameters (4.73M; 4.46M without attention).

    Args:
        cfg: see :class:`ImageBackboneConfig`.

    Example:
        >>> dec = ImageDecoder(ImageBackboneConfig(channels=16, channel_mult=(1, 2, 2)))
        >>> dec(torch.zeros(1, 256, 8, 12)).shape
        torch.Size([1, 3, 32, 48])
    """

    def __init__(self, cfg: ImageBackboneConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        c = widths[last]
        self.conv_in = nn.Conv2d(cfg.latent_dim, c, 1)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            blocks += _level(c, widths[level], cfg.num_res_blocks, cfg.attention and level == last)
            c = widths[level]
            if level > 0:
                # The upsampling conv narrows to the next level's width, so the
                # widest conv never runs at the doubled resolution.
                blocks.append(Upsample(c, widths[level - 1]))
                c = widths[level - 1]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv, where VQGAN's adaptive GAN weight compares
        gradient norms."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        """Decode latents.

        Args:
            z: ``(B, latent_dim, h, w)``.

        Returns:
            ``(B, C, h * f, w * f)`` images, nominally in ``[-1, 1]`` but not clamped.

        Raises:
            ValueError: wrong rank or channel count.
        """
        check_input(z, what="latent", layout="BCHW", channels=self.cfg.latent_dim)
        h = self.blocks(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))

