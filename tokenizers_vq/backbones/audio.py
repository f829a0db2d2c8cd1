"""1D audio backbones: a SEANet-like strided conv encoder (Tagliasacchi et al.
2020; as used by SoundStream and EnCodec) and a Vocos-style decoder (Siuzdak 2023)
that predicts an STFT at frame rate and inverts it with ``torch.istft``.

Frame ``t`` of the latent stands for samples ``[t * hop, (t + 1) * hop)``. With
``causal=True`` every conv pads on the left only, so the encoder's frame ``t``
sees samples ``< (t + 1) * hop`` and the decoder's per-frame spectrum sees
latent frames ``<= t``. The iSTFT's overlap-add then mixes neighbouring frames:
output sample ``n`` depends on latent frames ``<= n // hop + 2`` (each frame's
window reaches ``n_fft / 2 = 2 * hop`` samples back), a two-frame lookahead
for streaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.backbones import carry
from tokenizers_vq.backbones._blocks import check_input, check_multiple, check_positive


@dataclass
class AudioBackboneConfig:
    """Shape of the audio encoder / decoder pair.

    Attributes:
        sample_rate: samples per second of the waveform the model is trained on.
        channels: encoder width after the input conv; it doubles at each stride.
        strides: encoder downsampling factors; ``hop = prod(strides)`` samples
            per latent frame (the default 320 gives 50 tokens/s at 16 kHz).
        latent_dim: channels of the latent the quantizer sees.
        causal: left-only padding everywhere (streaming).
        decoder_dim: width of the ConvNeXt stack of the decoder.
        decoder_layers: number of ConvNeXt blocks of the decoder.
    """

    sample_rate: int = 16000
    channels: int = 32
    strides: tuple[int, ...] = (2, 4, 5, 8)
    latent_dim: int = 256
    causal: bool = False
    decoder_dim: int = 384
    decoder_layers: int = 8

    def __post_init__(self):
        self.strides = tuple(self.strides)
        for name in ("sample_rate", "channels", "latent_dim", "decoder_dim", "decoder_layers"):
            check_positive(name, getattr(self, name))
        check_positive("strides", self.strides)

    @property
    def hop(self) -> int:
        """Samples per latent frame, ``prod(strides)``."""
        return math.prod(self.strides)

    @property
    def stride(self) -> tuple[int]:
        """Input samples per latent cell along the trailing axis: ``(hop,)``."""
        return (self.hop,)

    @property
    def tokens_per_second(self) -> float:
        """Latent frames per second of audio (per codebook)."""
        return self.sample_rate / self.hop


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` whose padding keeps ``T_out = T_in / stride`` for ``T_in`` a
    multiple of ``stride``: all of it on the left when ``causal``, otherwise split
    evenly (one more on the left when odd).

    The left padding is the convolution's own (zeros on both sides, no padded copy of
    the input); the outputs that the right-hand zeros add are cut off, which is the same
    function as padding the input on the left only.

    While a stream runs it (a causal conv; :mod:`tokenizers_vq.streaming`, state per thread in
    :mod:`~tokenizers_vq.backbones.carry`), the left padding is the inputs of the earlier chunks
    (their last ``padding`` samples; zeros before the first), so chunks give the outputs of one
    pass, and the channels-last weight is laid out once for the stream (a stream's frames are
    small: re-laying the weight out costs a fifth of a 15 ms push)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, dilation: int = 1, groups: int = 1, causal: bool
    ):
        total = dilation * (kernel - 1) + 1 - stride
        if total < 0:
            raise ValueError(f"a conv of kernel {kernel} (dilation {dilation}) cannot keep T / {stride} frames: "
                             f"its span {dilation * (kernel - 1) + 1} must be at least the stride")
        left = total if causal else total - total // 2
        super().__init__(c_in, c_out, kernel, stride=stride, dilation=dilation, groups=groups, padding=left)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T)``, or ``(B, C, 1, T)`` channels-last (:func:`_run_channels_last`)."""
        pad, n, run = self.padding[0], x.shape[-1] // self.stride[0], carry.of(self)
        if run is not None and pad:
            x = torch.cat([x.new_zeros(*x.shape[:-1], pad) if run.inputs is None else run.inputs, x], dim=-1)
            run.inputs, pad = x[..., x.shape[-1] - pad :].clone(), 0
        if x.ndim == 4:
            w = None if run is None else run.weight
            if w is None:  # (a 1-channel input alone would not tell oneDNN which layout to write)
                w = self.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
                if run is not None:
                    run.weight = w
            y = F.conv2d(x, w, self.bias, (1, self.stride[0]), (0, pad), (1, self.dilation[0]), self.groups)
        else:
            y = F.conv1d(x, self.weight, self.bias, self.stride, pad, self.dilation, self.groups)
        return y if y.shape[-1] == n else y[..., :n]


def _run_channels_last(layers: nn.Module, x: Tensor) -> Tensor:
    """``layers(x)`` for ``x (B, C, T)`` with every activation held as ``(B, C, 1, T)``
    channels-last, time-major: oneDNN's bf16 convolutions over few channels and many samples
    run 2-14x faster that way than on ``(B, C, T)``, and the fp32 encoder about 1.25x (some
    fp32 convolutions gain, a few lose). The encoder uses it for CPU inference; training keeps
    ``(B, C, T)``. Returns ``(B, C', T')`` (a view of the channels-last result)."""
    return layers(x.unsqueeze(2).contiguous(memory_format=torch.channels_last)).squeeze(2)


class ResidualUnit(nn.Module):
    """``(B, C, T) -> (B, C, T)``: SiLU, dilated kernel-7 conv, SiLU, 1x1 conv, plus
    the input."""

    def __init__(self, c: int, dilation: int, causal: bool):
        super().__init__()
        hidden = max(c // 2, 1)
        self.conv1 = Conv1d(c, hidden, 7, dilation=dilation, causal=causal)
        self.conv2 = Conv1d(hidden, c, 1, causal=causal)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.silu(self.conv1(F.silu(x)))).add_(x)  # in place on the fresh conv output


class AudioEncoder(nn.Module):
    """``(B, 1, T) -> (B, latent_dim, T / hop)``.

    Per stride ``s``: residual units with dilations 1, 3, 9, then a stride-``s``
    conv of kernel ``2s`` that doubles the width. The default config has
    3,939,888 parameters (3.94M).

    Args:
        cfg: see :class:`AudioBackboneConfig`.

    Example:
        >>> enc = AudioEncoder(AudioBackboneConfig(channels=8, strides=(2, 4)))
        >>> enc(torch.zeros(2, 1, 80)).shape
        torch.Size([2, 256, 10])
    """

    def __init__(self, cfg: AudioBackboneConfig):
        super().__init__()
        self.cfg = cfg
        causal = cfg.causal
        c = cfg.channels
        layers: list[nn.Module] = [Conv1d(1, c, 7, causal=causal)]
        for s in cfg.strides:
            layers += [ResidualUnit(c, d, causal) for d in (1, 3, 9)]
            layers += [nn.SiLU(), Conv1d(c, 2 * c, 2 * s, stride=s, causal=causal)]
            c *= 2
        layers += [nn.SiLU(), Conv1d(c, cfg.latent_dim, 3, causal=causal)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Encode mono waveforms.

        Args:
            x: ``(B, 1, T)`` waveform, ``T`` a multiple of ``cfg.hop``.

        Returns:
            ``(B, latent_dim, T / hop)`` latents.

        Raises:
            ValueError: wrong rank or channel count, or ``T`` not a multiple of ``hop``.
        """
        check_input(x, what="audio", layout="BCT", channels=1)
        check_multiple(x.shape[2], self.cfg.hop, what="audio length", factor_name="hop")
        if x.device.type == "cpu" and not torch.is_grad_enabled():  # inference; training keeps (B, C, T)
            return _run_channels_last(self.layers, x)
        return self.layers(x)


class ConvNeXtBlock(nn.Module):
    """``(B, D, F) -> (B, D, F)``: depthwise kernel-7 conv, LayerNorm over channels,
    a 3x-wide SiLU MLP and a learned per-channel scale, added residually."""

    def __init__(self, dim: int, layer_scale: float, causal: bool):
        super().__init__()
        self.dwconv = Conv1d(dim, dim, 7, groups=dim, causal=causal)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 3 * dim)
        self.fc2 = nn.Linear(3 * dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))  # (B, F, D)
        h = self.fc2(F.silu(self.fc1(h))) * self.scale
        return x + h.transpose(1, 2)


class AudioDecoder(nn.Module):
    """``(B, latent_dim, F) -> (B, 1, F * hop)`` through an iSTFT head.

    A kernel-7 conv and ``decoder_layers`` ConvNeXt blocks run at frame rate; a
    linear head gives, per frame, a log-magnitude and a phase for the
    ``n_fft / 2 + 1`` bins of an STFT with ``n_fft = 4 * hop`` (Hann window,
    75% overlap), inverted by ``torch.istft`` (``center=True``, trimmed to exactly
    ``F * hop`` samples). The magnitude is ``exp`` of the log-magnitude clipped
    at 100, which keeps early training from overflowing. The default config has
    8,307,586 parameters (8.31M; 7.1M of them in the ConvNeXt blocks).

    Args:
        cfg: see :class:`AudioBackboneConfig`.

    Example:
        >>> dec = AudioDecoder(AudioBackboneConfig(strides=(2, 4), decoder_dim=32, decoder_layers=2))
        >>> dec(torch.zeros(2, 256, 10)).shape
        torch.Size([2, 1, 80])
    """

    def __init__(self, cfg: AudioBackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.n_fft = 4 * cfg.hop
        d = cfg.decoder_dim
        self.conv_in = Conv1d(cfg.latent_dim, d, 7, causal=cfg.causal)
        self.norm_in = nn.LayerNorm(d, eps=1e-6)
        self.blocks = nn.Sequential(
            *(ConvNeXtBlock(d, 1.0 / cfg.decoder_layers, cfg.causal) for _ in range(cfg.decoder_layers))
        )
        self.norm_out = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, self.n_fft + 2)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the linear head, where VQGAN's adaptive GAN weight compares
        gradient norms."""
        return self.head.weight

    def frame_features(self, z: Tensor) -> Tensor:
        """The head's output before the iSTFT; frame ``t`` depends on latent frames
        ``<= t`` only when ``cfg.causal``.

        Args:
            z: ``(B, latent_dim, F)``.

        Returns:
            ``(B, n_fft + 2, F)``: log-magnitudes (first half) and phases (second
            half) of the ``n_fft / 2 + 1`` bins.
        """
        check_input(z, what="latent", layout="BCF", channels=self.cfg.latent_dim)
        h = self.norm_in(self.conv_in(z).transpose(1, 2)).transpose(1, 2)
        h = self.norm_out(self.blocks(h).transpose(1, 2))  # (B, F, D)
        return self.head(h).transpose(1, 2)

    def spectrum(self, z: Tensor) -> Tensor:
        """The complex STFT ``(B, n_fft / 2 + 1, F)`` the iSTFT inverts (float32): magnitudes
        ``exp`` of the log-magnitudes clipped at 100, and the phases."""
        log_mag, phase = self.frame_features(z).float().chunk(2, dim=1)
        return torch.polar(torch.exp(log_mag.clamp(max=math.log(100.0))), phase)

    def forward(self, z: Tensor) -> Tensor:
        """Decode latents to waveforms.

        Args:
            z: ``(B, latent_dim, F)``.

        Returns:
            ``(B, 1, F * hop)`` waveform (float32 even under autocast, since the
            iSTFT needs it).

        Raises:
            ValueError: wrong rank or channel count.
        """
        spec = self.spectrum(z)  # (its input checks first)
        frames = z.shape[2]
        wav = torch.istft(
            spec,
            n_fft=self.n_fft,
            hop_length=self.cfg.hop,
            win_length=self.n_fft,
            window=self.window.float(),
            center=True,
            length=frames * self.cfg.hop,
        )
        return wav.unsqueeze(1)
