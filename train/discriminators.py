"""Discriminators. Each returns ``(logits, features)``: lists of tensors, one logit
map per head and every head's intermediate activations (for feature matching)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.spectral import stft_magnitude


class PatchGAN(nn.Module):
    """PatchGAN (Isola et al. 2017) as in VQGAN: strided convs to a map of logits,
    one per receptive-field patch; ``dims=3`` gives the 3D version for video.

    Args:
        in_channels: image/video channels.
        channels: width of the first layer (doubled per layer up to 8x).
        layers: number of strided layers.
        dims: 2 (images ``(B, C, H, W)``) or 3 (video ``(B, C, T, H, W)``).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, dims: int = 2):
        super().__init__()
        if dims == 2:
            conv, k, s2, s1, pad = nn.Conv2d, 4, 2, 1, 1
        else:  # video: 3-frame kernels, time kept (clips are short), space halved
            conv, k, s2, s1, pad = nn.Conv3d, (3, 4, 4), (1, 2, 2), 1, (1, 1, 1)
        blocks: list[nn.Module] = [nn.Sequential(conv(in_channels, channels, k, s2, pad), nn.LeakyReLU(0.2))]
        ch = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2**i, 8)
            stride = s2 if i < layers else s1
            blocks.append(nn.Sequential(conv(ch, nxt, k, stride, pad), nn.GroupNorm(min(32, nxt // 4), nxt), nn.LeakyReLU(0.2)))
            ch = nxt
        self.blocks = nn.ModuleList(blocks)
        self.head = conv(ch, 1, k, 1, pad)

    def min_side(self) -> int:
        """The smallest crop side (pixels) that leaves this discriminator at least one logit."""
        convs = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        side = 1
        while True:
            n = side
            for c in convs:
                n = (n + 2 * c.padding[-1] - c.kernel_size[-1]) // c.stride[-1] + 1
            if n >= 1:
                return side
            side += 1

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        return [self.head(x)], feats


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN period head: the waveform folded to ``(T/p, p)`` and 2D-convolved."""

    def __init__(self, period: int, channels: int = 32):
        super().__init__()
        self.period = period
        chs = [1, channels, channels * 4, channels * 16, channels * 16]
        self.convs = nn.ModuleList(
            nn.Conv2d(chs[i], chs[i + 1], (5, 1), (3 if i < 3 else 1, 1), (2, 0)) for i in range(4)
        )
        self.head = nn.Conv2d(chs[-1], 1, (3, 1), 1, (1, 0))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, c, t = x.shape
        x = F.pad(x, (0, -t % self.period), mode="reflect").view(b, c, -1, self.period)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            feats.append(x)
        return self.head(x), feats


class STFTDiscriminator(nn.Module):
    """One resolution of a multi-resolution magnitude-spectrogram discriminator."""

    def __init__(self, n_fft: int, channels: int = 32):
        super().__init__()
        self.n_fft = n_fft
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, channels, (3, 9), 1, (1, 4)),
                nn.Conv2d(channels, channels, (3, 9), (1, 2), (1, 4)),
                nn.Conv2d(channels, channels, (3, 9), (1, 2), (1, 4)),
                nn.Conv2d(channels, channels, (3, 3), 1, (1, 1)),
            ]
        )
        self.head = nn.Conv2d(channels, 1, 3, 1, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        mag = stft_magnitude(x, self.n_fft, self.n_fft // 4).transpose(1, 2).unsqueeze(1)  # (B, 1, frames, bins)
        h = torch.log1p(mag)
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.1)
            feats.append(h)
        return self.head(h), feats


class AudioDiscriminator(nn.Module):
    """Multi-period (periods 2, 3, 5, 7, 11) plus multi-resolution STFT
    (FFT 512, 1024, 2048) heads, as in HiFi-GAN / UnivNet / WavTokenizer."""

    def __init__(self, periods: tuple[int, ...] = (2, 3, 5, 7, 11), ffts: tuple[int, ...] = (512, 1024, 2048)):
        super().__init__()
        self.heads = nn.ModuleList([PeriodDiscriminator(p) for p in periods] + [STFTDiscriminator(n) for n in ffts])

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        logits, feats = [], []
        for head in self.heads:
            lg, ft = head(x)
            logits.append(lg)
            feats.extend(ft)
        return logits, feats


def build_discriminator(modality: str, in_channels: int = 3) -> nn.Module:
    """The discriminator family for a modality (explicit table, no import strings)."""
    table = {
        "image": lambda: PatchGAN(in_channels, dims=2),
        "video": lambda: PatchGAN(in_channels, channels=32, dims=3),
        "audio": AudioDiscriminator,
    }
    if modality not in table:
        raise ValueError(f"no discriminator for modality {modality!r}")
    return table[modality]()
