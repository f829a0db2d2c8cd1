"""Streaming encode / decode for causal audio tokenizers.

:class:`AudioEncodeStream` takes waveform chunks of any length and returns each
token frame as soon as it is final; :class:`AudioDecodeStream` takes code frames
and returns each audio sample as soon as it is final. Both keep a bounded tail
of their input between calls and give the same result as the offline
``Tokenizer.encode`` / ``Tokenizer.decode`` (tokens equal, audio equal up to
float rounding), because every output is computed from a window that holds its
whole receptive field, aligned to the offline frame grid (windowed recomputation).
The window's latents differ from the offline ones by float rounding only (~1e-8),
so a token can differ only where two codewords are equally near to that
precision, e.g. duplicate codewords, which decode to the same latent.

Algorithmic delay (see ``tokenizers_vq.backbones.audio``; ``hop`` samples per frame):

- encoder: the token of frame ``t`` is final once sample ``(t + 1) * hop - 1`` has
  arrived, at most ``hop - 1`` samples after the first sample of its frame;
- decoder: the samples of frame ``k`` are final once code frame ``k + 2`` has
  arrived (the iSTFT window of a frame spans ``n_fft = 4 * hop`` samples), a
  delay of ``2 * hop`` samples.

Compute per emitted batch of frames is that of the encoder over
``ceil(R / hop)`` extra frames (``R`` from :func:`receptive_field`) and of the
decoder over ``receptive_field(decoder) + 1`` extra frames; pushing many frames
at once amortizes it (the embedded speech model on 2 CPU cores, encode + decode: real-time
factor 1.57 in 15 ms chunks, 0.75 in 30 ms, 0.26 in 100 ms). A long push is coded
``chunk_frames`` frames at a time, so memory stays bounded.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from tokenizers_vq.tokenizer import Tokenizer

LOOKAHEAD_FRAMES = 2
"""Code frames after frame ``k`` that the decoder's iSTFT needs before the samples
of frame ``k`` are final (``n_fft / 2 = 2 * hop``)."""


def receptive_field(module: nn.Module) -> int:
    """Input positions that one output position of a causal stack of ``Conv1d``s
    depends on, counting the output's own latest input.

    Walks the ``nn.Conv1d`` modules in registration order, which is their order in
    the signal path for the audio encoder and decoder (a residual branch adds its
    convs to the chain; the skip path sees a subset of the same inputs):
    ``r += dilation * (kernel - 1) * jump`` and ``jump *= stride`` per conv.

    Args:
        module: e.g. ``AudioEncoder`` (result in samples: frame ``t`` depends on
            samples ``[(t + 1) * hop - r, (t + 1) * hop)``) or ``AudioDecoder``
            (result in frames: its frame ``t`` features depend on code frames
            ``[t - r + 1, t]``).

    Returns:
        ``r >= 1``.

    Example:
        >>> from tokenizers_vq.backbones import AudioBackboneConfig, AudioEncoder
        >>> receptive_field(AudioEncoder(AudioBackboneConfig(channels=4, strides=(2, 4), causal=True)))
        274
    """
    r, jump = 1, 1
    for m in module.modules():
        if isinstance(m, nn.Conv1d):
            r += m.dilation[0] * (m.kernel_size[0] - 1) * jump
            jump *= m.stride[0]
    return r


def _check_streamable(tok: Tokenizer) -> None:
    if not tok.media.streams:
        raise ValueError(f"streaming is for audio tokenizers, not {tok.modality}")
    if tok.is_dynamic:
        raise ValueError("streaming needs fixed-rate codes; a dynamic-length tokenizer codes each item whole")
    if not tok.backbone_config.causal:
        raise ValueError(
            "streaming needs a causal audio model (each frame must not see future samples); "
            "train one with model.backbone.causal=true"
        )


class AudioEncodeStream:
    """Waveform chunks in, token frames out, equal to ``tok.encode`` of the whole.

    Args:
        tok: a causal, fixed-rate audio :class:`~tokenizers_vq.tokenizer.Tokenizer`.

    Attributes:
        samples_in: samples received so far (the ``size`` to give the decoder's
            ``flush`` for the original length).
        frames_out: token frames returned so far.

    Raises:
        ValueError: ``tok`` is not a causal, fixed-rate audio tokenizer.
    """

    def __init__(self, tok: Tokenizer):
        _check_streamable(tok)
        self.tok = tok
        self.hop = tok.backbone_config.hop
        self.context = math.ceil(receptive_field(tok.encoder) / self.hop) * self.hop
        p = next(tok.encoder.parameters())
        self._buf = torch.zeros(0, dtype=p.dtype, device=p.device)  # samples from _buf_start on
        self._buf_start = 0
        self.samples_in = 0
        self.frames_out = 0
        self._closed = False

    def push(self, chunk: Tensor) -> Tensor:
        """Add samples; return the token frames they complete.

        Args:
            chunk: ``(n,)``, ``(1, n)`` or ``(1, 1, n)`` float samples at the model's
                rate; ``n`` may be 0.

        Returns:
            ``(frames, *code_shape)`` int64 codes, ``frames = (samples_in // hop) -
            frames_out`` before the call updates them (possibly 0).

        Raises:
            ValueError: bad shape or dtype, NaN/Inf or values past ``modality.INPUT_LIMIT``, or the stream
                is flushed.
        """
        if self._closed:
            raise ValueError("push after flush: start a new stream with tok.encode_stream()")
        if not isinstance(chunk, Tensor) or not chunk.is_floating_point():
            raise ValueError(f"audio chunks must be floating-point tensors: {self.tok.media.input_scale}")
        if chunk.ndim not in (1, 2, 3) or any(s != 1 for s in chunk.shape[:-1]):
            raise ValueError(f"audio chunks must be (n,), (1, n) or (1, 1, n) mono samples, got {tuple(chunk.shape)} "
                             "(mix channels (C, n) to mono first: chunk.mean(0))")
        if chunk.numel():
            self.tok.media.check_range(self.tok.media.input_range(chunk.reshape(1, -1)))
        self._buf = torch.cat([self._buf, chunk.reshape(-1).to(self._buf)])
        self.samples_in += chunk.shape[-1]
        return self._emit(self.samples_in // self.hop)

    def flush(self) -> Tensor:
        """End the stream: zero-pad the last partial frame (as ``tok.encode`` does)
        and return the remaining token frames, ``(frames, *code_shape)`` int64."""
        if self._closed:
            raise ValueError("the stream is already flushed")
        frames = -(-self.samples_in // self.hop)
        self._buf = torch.cat([self._buf, self._buf.new_zeros(frames * self.hop - self.samples_in)])
        codes = self._emit(frames)
        self._closed = True
        return codes

    def _emit(self, end: int) -> Tensor:
        """Codes of frames ``[frames_out, end)``, at most ``chunk_frames`` (the offline
        chunk) at a time: memory stays bounded however long a pushed chunk."""
        parts = [self._emit_part(min(end, self.frames_out + self.tok.config.chunk_frames))
                 for _ in range(0, end - self.frames_out, self.tok.config.chunk_frames)]
        if not parts:
            return torch.zeros((0, *self.tok.quantizer.code_shape), dtype=torch.long, device=self._buf.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _emit_part(self, end: int) -> Tensor:
        """Codes of frames ``[frames_out, end)`` from the window that holds their
        receptive fields (from sample 0 when they reach before it, as offline)."""
        start = self.frames_out
        w = max(0, start * self.hop - self.context)
        window = self._buf[w - self._buf_start : end * self.hop - self._buf_start]
        with torch.no_grad():
            codes = self.tok._encode_aligned(window.view(1, 1, -1))[0, start - w // self.hop :]
        self.frames_out = end
        keep = max(0, end * self.hop - self.context)
        self._buf, self._buf_start = self._buf[keep - self._buf_start :], keep
        return codes


class AudioDecodeStream:
    """Code frames in, waveform out, equal to ``tok.decode`` of the whole (up to
    float rounding).

    Args:
        tok: a causal, fixed-rate audio :class:`~tokenizers_vq.tokenizer.Tokenizer`.

    Attributes:
        frames_in: code frames received so far.
        samples_out: samples returned so far.

    Raises:
        ValueError: ``tok`` is not a causal, fixed-rate audio tokenizer.
    """

    def __init__(self, tok: Tokenizer):
        _check_streamable(tok)
        self.tok = tok
        self.hop = tok.backbone_config.hop
        self.code_shape = tuple(tok.quantizer.code_shape)
        # frames before the first sample to emit: the decoder's conv history plus
        # the iSTFT frames whose windows reach back over it
        self.context = receptive_field(tok.decoder) - 1 + LOOKAHEAD_FRAMES
        self._device = next(tok.decoder.parameters()).device
        self._codes = torch.zeros((0, *self.code_shape), dtype=torch.long, device=self._device)
        self._codes_start = 0  # frame index of _codes[0]
        self.frames_in = 0
        self.samples_out = 0
        self._closed = False

    def push(self, codes: Tensor) -> Tensor:
        """Add code frames; return the samples that became final.

        Args:
            codes: ``(n, *code_shape)`` or ``(1, n, *code_shape)`` integer codes;
                ``n`` may be 0.

        Returns:
            ``(1, m)`` float32 samples, ``m = max(0, (frames_in - 2) * hop) -
            samples_out`` before the call updates them (possibly 0).

        Raises:
            ValueError: bad shape, dtype or range, or the stream is flushed.
        """
        if self._closed:
            raise ValueError("push after flush: start a new stream with tok.decode_stream()")
        integer = isinstance(codes, Tensor) and not (codes.is_floating_point() or codes.is_complex())
        if not integer or codes.dtype is torch.bool:
            raise ValueError("codes must be an integer tensor")
        cs = self.code_shape
        if codes.ndim == len(cs) + 2 and codes.shape[0] == 1:
            codes = codes[0]
        if codes.ndim != len(cs) + 1 or tuple(codes.shape[1:]) != cs:
            raise ValueError(f"codes must be (n, *{cs}) or (1, n, *{cs}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.tok.codebook_size):
            raise ValueError(f"codes out of range [0, {self.tok.codebook_size})")
        self._codes = torch.cat([self._codes, codes.to(self._codes)])
        self.frames_in += codes.shape[0]
        return self._emit(max(0, self.frames_in - LOOKAHEAD_FRAMES) * self.hop)

    def flush(self, size: int | None = None) -> Tensor:
        """End the stream and return the remaining samples, ``(1, m)`` float32.

        Args:
            size: total samples of the decoded stream (e.g. the encoder stream's
                ``samples_in``), cropping the last frame's padding as
                ``tok.decode(codes, size=(size,))`` does; ``None`` keeps all
                ``frames_in * hop``.

        Raises:
            ValueError: ``size`` is not a whole number or is below the samples already
                returned (the stream stays open).
        """
        if self._closed:
            raise ValueError("the stream is already flushed")
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
            raise ValueError(f"size must be a whole number of samples, got {size!r}")
        end = self.frames_in * self.hop if size is None else min(int(size), self.frames_in * self.hop)
        if end < self.samples_out:
            raise ValueError(f"size={size} is below the {self.samples_out} samples already returned")
        wav = self._emit(end)
        self._closed = True
        return wav

    def _emit(self, end: int) -> Tensor:
        """Samples ``[samples_out, end)``, at most ``chunk_frames`` frames of them (the
        offline chunk) at a time: memory stays bounded however long a pushed chunk."""
        step = self.tok.config.chunk_frames * self.hop
        parts = [self._emit_part(min(end, self.samples_out + step)) for _ in range(self.samples_out, end, step)]
        if not parts:
            return torch.zeros(1, 0, device=self._device)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _emit_part(self, end: int) -> Tensor:
        """Samples ``[samples_out, end)`` from the decoder run on the code frames that
        reach them (from frame 0 when they reach before it, as offline), up to the
        ``LOOKAHEAD_FRAMES`` after the last of them that the iSTFT needs."""
        s = self.samples_out
        a = max(0, s // self.hop - self.context)
        b = min(self.frames_in, -(-end // self.hop) + LOOKAHEAD_FRAMES)
        window = self._codes[a - self._codes_start : b - self._codes_start]
        with torch.no_grad():
            wav = self.tok._decode_aligned(window.unsqueeze(0))[0]  # (1, (b - a) * hop)
        self.samples_out = end
        keep = max(0, end // self.hop - self.context)
        self._codes, self._codes_start = self._codes[keep - self._codes_start :], keep
        return wav[:, s - a * self.hop : end - a * self.hop]
