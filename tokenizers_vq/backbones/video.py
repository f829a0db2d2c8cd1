"""Causal 3D conv encoder and decoder for video, in the layout of MAGVIT-v2 (Yu et
al. 2024) and Cosmos tokenizers (NVIDIA 2025): the first frame is coded on its
own, every later group of ``temporal_factor`` frames shares a latent frame, so a
clip of ``1 + 4k`` frames gives ``1 + k`` latent frames at the default x4 in time.

Causality in time is built in: convs pad only with past frames (copies of
frame 0 before the clip starts) and GroupNorm statistics are taken per frame,
so latent frame ``j`` depends on input frames ``<= 4j`` and output frame ``i``
on latent frames ``<= ceil(i / 4)``. The same model thus encodes a still image
(``T = 1``) and lets clips be coded in streaming order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.backbones import carry
from tokenizers_vq.backbones._blocks import check_input, check_multiple, check_positive, group_norm
from tokenizers_vq.backbones.time_chunks import frames_per_chunk, run_over_time, time_major


@dataclass
class VideoBackboneConfig:
    """Shape of the video encoder / decoder pair.

    Attributes:
        in_channels: frame channels ``C`` (3 for RGB).
        channels: base width; level ``i`` has ``channels * channel_mult[i]``.
        channel_mult: width multiplier per level; ``len(channel_mult) - 1``
            spatial halvings (x8 by default).
        temporal_downsample: how many of those halvings also halve time (the
            deepest ones); time is reduced ``2 ** temporal_downsample`` times.
        num_res_blocks: residual blocks per level.
        latent_dim: channels of the latent the quantizer sees.
        decoder_res_blocks: residual blocks per level of the decoder (0: ``num_res_blocks``);
            a deeper decoder than encoder spends parameters where reconstruction needs them.
    """

    in_channels: int = 3
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    temporal_downsample: int = 2
    num_res_blocks: int = 1
    latent_dim: int = 256
    decoder_res_blocks: int = 0

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        for name in ("in_channels", "channels", "num_res_blocks", "latent_dim"):
            check_positive(name, getattr(self, name))
        if self.decoder_res_blocks < 0:
            raise ValueError(f"decoder_res_blocks must be >= 0 (0: num_res_blocks), got {self.decoder_res_blocks}")
        check_positive("channel_mult", self.channel_mult)
        if not 0 <= self.temporal_downsample <= len(self.channel_mult) - 1:
            raise ValueError(
                f"temporal_downsample must be in [0, {len(self.channel_mult) - 1}] "
                f"(the number of downsamplings), got {self.temporal_downsample}"
            )

    @property
    def spatial_downsample(self) -> int:
        """Spatial reduction factor: one latent position per ``f x f`` pixels."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def stride(self) -> tuple[int, int]:
        """Pixels per latent cell along ``(H, W)`` (time goes by :attr:`temporal_factor`)."""
        return (self.spatial_downsample, self.spatial_downsample)

    @property
    def decoder_blocks(self) -> int:
        """Residual blocks per decoder level."""
        return self.decoder_res_blocks or self.num_res_blocks

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first: ``1 + factor * k -> 1 + k``."""
        return 2**self.temporal_downsample

    def halves_time(self, i: int) -> bool:
        """Whether downsampling ``i`` (from level ``i`` to ``i + 1``) also halves time."""
        return i >= len(self.channel_mult) - 1 - self.temporal_downsample


def _cpu_layout(x: Tensor) -> Tensor:
    """``x`` channels-last at CPU inference under bf16 (autocast or bf16 tensors), where
    oneDNN's bf16 3-D convolutions run fastest (the encoder about 1.5x); else as it is."""
    bf16 = x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
    if x.device.type == "cpu" and bf16 and not torch.is_grad_enabled():
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


class CausalConv3d(nn.Conv3d):
    """``(B, C_in, T, H, W) -> (B, C_out, T', H / s, W / s)`` with ``T' = T`` at time
    stride 1 and ``T' = 1 + (T - 1) / 2`` at time stride 2 (``T`` odd).

    Time is padded with ``kernel_t - 1`` copies of frame 0 on the left only, so
    output frame ``j`` sees input frames ``<= j * stride_t`` (frame 0 only itself);
    space is zero-padded by ``kernel // 2`` on each side."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: tuple[int, int] = (1, 1)):
        st, ss = stride
        super().__init__(c_in, c_out, kernel, stride=(st, ss, ss), padding=(0, kernel // 2, kernel // 2))
        self.time_pad = kernel - 1

    carries_time = True  # run over time in chunks, it pads with the earlier chunk's frames

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            run = carry.of(self)  # while run over time in chunks (time_chunks): the last input frames seen
            first = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1) if run is None or run.inputs is None else run.inputs
            if time_major(x) and not torch.is_grad_enabled():  # keep the layout (cat would not)
                b, c, t, h, w = x.shape
                padded = torch.empty((b, c, t + self.time_pad, h, w), dtype=x.dtype, device=x.device,
                                     memory_format=torch.channels_last_3d)
                x = torch.cat([first, x], dim=2, out=padded)
            else:
                x = torch.cat([first, x], dim=2)
            if run is not None:  # a copy: a view would keep this whole chunk alive until the next
                run.inputs = x[:, :, -self.time_pad:].clone()
        return super().forward(x)


class FrameNorm(nn.Module):
    """GroupNorm with statistics per frame: ``(B, C, T, H, W)`` normalised as
    ``B * T`` images, since statistics over time would leak future frames."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock3d(nn.Module):
    """``(B, C_in, T, H, W) -> (B, C_out, T, H, W)``: two (FrameNorm, SiLU, causal
    3x3x3 conv) layers plus a 1x1x1-projected skip when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(c_in), CausalConv3d(c_in, c_out)
        self.norm2, self.conv2 = FrameNorm(c_out), CausalConv3d(c_out, c_out)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample3d(nn.Module):
    """``(B, C_in, T, H, W) -> (B, C_out, T', 2H, 2W)``: nearest x2 in space and,
    when ``time``, each frame after the first repeated twice (``T' = 2T - 1``,
    output frame ``i`` copies input frame ``ceil(i / 2)``), then a causal conv."""

    def __init__(self, c_in: int, c_out: int, time: bool):
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(c_in, c_out)

    @property
    def doubles_time(self) -> bool:
        return self.time

    def forward(self, x: Tensor) -> Tensor:
        layout = torch.channels_last_3d if time_major(x) else torch.contiguous_format
        if self.time:  # a later chunk of a clip run over time (``run_over_time``) has no first frame
            first = (run := carry.of(self.conv)) is None or run.inputs is None
            x = x.repeat_interleave(2, dim=2)[:, :, (1 if first else 0):]
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.conv(x.contiguous(memory_format=layout))  # (the layout it came in)


class VideoEncoder(nn.Module):
    """``(B, C, 1 + 4k, H, W) -> (B, latent_dim, 1 + k, H / 8, W / 8)`` (defaults).

    Per level: ``num_res_blocks`` causal ResBlocks, then a stride-2 causal conv
    (stride 2 in time as well on the deepest ``temporal_downsample`` levels).
    The default config has 9,517,504 parameters (9.52M).

    Args:
        cfg: see :class:`VideoBackboneConfig`.

    Example:
        >>> enc = VideoEncoder(VideoBackboneConfig(channels=8))
        >>> enc(torch.zeros(1, 3, 9, 16, 24)).shape
        torch.Size([1, 256, 3, 2, 3])
    """

    def __init__(self, cfg: VideoBackboneConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0])
        blocks: list[nn.Module] = []
        c = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock3d(c, width))
                c = width
            if level < len(widths) - 1:
                blocks.append(CausalConv3d(c, c, stride=(2 if cfg.halves_time(level) else 1, 2)))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = FrameNorm(c)
        self.conv_out = nn.Conv3d(c, cfg.latent_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode clips.

        Args:
            x: ``(B, C, T, H, W)`` in ``[-1, 1]`` with ``T = 1 + temporal_factor * k``
                and ``H``, ``W`` multiples of ``spatial_downsample``.

        Returns:
            ``(B, latent_dim, 1 + k, H / f, W / f)`` latents.

        Raises:
            ValueError: wrong rank or channel count, or incompatible sizes.
        """
        check_input(x, what="video", layout="BCTHW", channels=self.cfg.in_channels)
        n, tf = x.shape[2], self.cfg.temporal_factor
        if (n - 1) % tf != 0:
            raise ValueError(
                f"video has {n} frames; expected 1 + {tf}k frames (the first frame is coded on its own), "
                f"e.g. {1 + tf * ((n - 1) // tf)} or {1 + tf * ((n - 1) // tf + 1)}"
            )
        f = self.cfg.spatial_downsample
        check_multiple(x.shape[3], f, what="video height", factor_name="the spatial downsampling factor")
        check_multiple(x.shape[4], f, what="video width", factor_name="the spatial downsampling factor")
        stages = [self.conv_in, *self.blocks]
        cut = next((i for i, m in enumerate(stages) if isinstance(m, CausalConv3d) and m.stride[0] == 2),
                   len(stages))  # the first stage that halves time
        chunk = frames_per_chunk(x.shape[0], n, x.shape[3] * x.shape[4], x.device)
        h = run_over_time(stages[:cut], _cpu_layout(x), chunk)
        for stage in stages[cut:]:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VideoDecoder(nn.Module):
    """``(B, latent_dim, 1 + k, h, w) -> (B, C, 1 + 4k, 8h, 8w)`` (defaults),
    unbounded (no tanh).

    Mirrors :class:`VideoEncoder`; upsampling repeats frames (all but the first)
    and pixels, then applies a causal conv that narrows to the next level's
    width. The default config has 11,134,979 parameters (11.13M).

    Args:
        cfg: see :class:`VideoBackboneConfig`.

    Example:
        >>> dec = VideoDecoder(VideoBackboneConfig(channels=8))
        >>> dec(torch.zeros(1, 256, 3, 2, 3)).shape
        torch.Size([1, 3, 9, 16, 24])
    """

    def __init__(self, cfg: VideoBackboneConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels * m for m in cfg.channel_mult]
        c = widths[-1]
        self.conv_in = nn.Conv3d(cfg.latent_dim, c, 1)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.decoder_blocks):
                blocks.append(ResBlock3d(c, widths[level]))
                c = widths[level]
            if level > 0:
                blocks.append(Upsample3d(c, widths[level - 1], time=cfg.halves_time(level - 1)))
                c = widths[level - 1]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = FrameNorm(c)
        self.conv_out = CausalConv3d(c, cfg.in_channels)

    def load_shallower(self, state: dict[str, Tensor], blocks: int) -> None:
        """Load a decoder of the same widths with ``blocks`` (fewer) residual blocks per
        level; each level's added blocks follow the loaded ones and start as the identity
        (their last conv zero), so this decoder decodes exactly as that one did and training
        goes on from there.

        Args:
            state: the shallower decoder's ``state_dict()`` (keys such as ``blocks.2.conv1.weight``).
            blocks: its residual blocks per level.

        Raises:
            ValueError: ``blocks`` is not below this decoder's, or the weights do not fit.
        """
        mine = self.cfg.decoder_blocks
        if not 0 < blocks < mine:
            raise ValueError(f"a shallower decoder has 1 to {mine - 1} residual blocks per level, got {blocks}")
        renamed, new = {}, []
        old_i = new_i = 0
        for level in reversed(range(len(self.cfg.channel_mult))):
            for j in range(mine + (level > 0)):  # the residual blocks, then the upsampling
                if j < blocks or j == mine:
                    prefix = f"blocks.{old_i}."
                    renamed.update({f"blocks.{new_i}." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
                    old_i += 1
                else:
                    new.append(self.blocks[new_i])
                new_i += 1
        renamed.update({k: v for k, v in state.items() if not k.startswith("blocks.")})
        beyond = sorted(k for k in state if k.startswith("blocks.") and int(k.split(".")[1]) >= old_i)
        fit = f"weights do not fit a decoder with {blocks} blocks per level and these widths"
        try:
            missing, unexpected = self.load_state_dict(renamed, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise ValueError(f"{fit}: {e}") from None
        added = {f"blocks.{i}.{k}" for i, b in enumerate(self.blocks) if b in new for k in b.state_dict()}
        unexpected = list(unexpected) + beyond
        if unexpected or set(missing) != added:
            raise ValueError(f"{fit} (missing {sorted(set(missing) - added)[:5]}, unexpected {unexpected[:5]})")
        with torch.no_grad():
            for block in new:
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv, where VQGAN's adaptive GAN weight compares
        gradient norms."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        """Decode latents to clips.

        Args:
            z: ``(B, latent_dim, 1 + k, h, w)``.

        Returns:
            ``(B, C, 1 + temporal_factor * k, h * f, w * f)`` frames, nominally in
            ``[-1, 1]`` but not clamped.

        Raises:
            ValueError: wrong rank or channel count.
        """
        check_input(z, what="latent", layout="BCTHW", channels=self.cfg.latent_dim)
        stages = [self.conv_in, *self.blocks]
        start = max((i for i, m in enumerate(stages) if isinstance(m, Upsample3d) and m.time), default=0)
        h = _cpu_layout(z)
        for stage in stages[:start]:
            h = stage(h)
        rest = [*stages[start:], nn.Sequential(self.norm_out, nn.SiLU(), self.conv_out)]  # doubles time once at most
        per_frame = h.shape[3] * h.shape[4] * 4 ** sum(isinstance(m, Upsample3d) for m in rest) * 2
        return run_over_time(rest, h, frames_per_chunk(h.shape[0], h.shape[2], per_frame, h.device))
