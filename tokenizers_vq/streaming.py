"""Streaming encode / decode for causal audio tokenizers.

:class:`AudioEncodeStream` takes waveform chunks of any length and returns each
token frame as soon as it is final; :class:`AudioDecodeStream` takes code frames
and returns each audio sample as soon as it is final. Both give the same result as
the offline ``Tokenizer.encode`` / ``Tokenizer.decode`` (tokens equal, audio equal up
to float rounding) while computing each frame once: every causal convolution keeps
the last inputs its next frames need (:mod:`~tokenizers_vq.backbones.carry`, per stream and thread),
and the decoder's iSTFT keeps its overlap-add tail. The latents differ from the
offline ones by float rounding only (about 1e-6 of their size in fp32 and fp16 weights), so a token can
differ only where two codewords are equally near to that precision, e.g. duplicate codewords, which
decode to the same latent. With bf16 weights or under bf16 autocast the rounding depends on the
chunk sizes and is far coarser: a few tokens in a hundred-odd may differ from the offline ones.

Algorithmic delay (see ``tokenizers_vq.backbones.audio``; ``hop`` samples per frame):

- encoder: the token of frame ``t`` is final once sample ``(t + 1) * hop - 1`` has
  arrived, at most ``hop - 1`` samples after the first sample of its frame;
- decoder: the samples of frame ``k`` are final once code frame ``k + 2`` has
  arrived (the iSTFT window of a frame spans ``n_fft = 4 * hop`` samples), a
  delay of ``2 * hop`` samples.

A push costs its new frames plus a fixed overhead of one call per layer (the embedded
speech model on 2 CPU cores, encode + decode: real-time factor 0.61 in 15 ms chunks, 0.11
in 100 ms); a long push is coded ``chunk_frames`` frames at a time, so memory stays bounded.
A stream keeps each conv's weight as laid out at its first push: the model must not change
while a stream is open.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tokenizers_vq.backbones import carry
from tokenizers_vq.backbones.audio import Conv1d
from tokenizers_vq.errors import not_a_float_tensor

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
    _check_not_compiled(tok)


def _causal_convs(module: nn.Module) -> list[Conv1d]:
    return [m for m in module.modules() if isinstance(m, Conv1d)]


@contextlib.contextmanager
def _all_or_nothing(stream: object) -> Iterator[None]:
    """A push that fails part-way (a later chunk's check) leaves ``stream`` as it was before it:
    its attributes are put back (the stream replaces its tensors and tables, never writes into them)."""
    saved = dict(vars(stream))
    try:
        yield
    except BaseException:
        vars(stream).update(saved)
        raise


def _check_not_compiled(tok: Tokenizer) -> None:
    if any(carry.compiled(m) for part in (tok.encoder, tok.decoder) for m in part.modules()):
        raise ValueError("the model's encoder or decoder is compiled (torch.compile): a compiled graph does not "
                         "carry a stream's samples from one push to the next; stream with the model uncompiled "
                         "(compile a copy for offline coding)")


def _run_streaming(convs: list[Conv1d], state: dict | None, fn: Callable[[], Tensor]) -> tuple[Tensor, dict]:
    """``fn()`` with ``convs`` streaming from ``state`` (a stream's table of their carried inputs
    and laid-out weights; None at the start); returns its result and the table after it. The
    state is the stream's and this thread's (:mod:`~tokenizers_vq.backbones.carry`): streams of
    one tokenizer, its offline calls and other threads do not mix."""
    with carry.running(convs, state) as table, torch.no_grad():
        return fn(), table


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
        self._convs = _causal_convs(tok.encoder)
        self._carry: dict | None = None  # the convs' carried state (backbones.carry)
        p = next(tok.encoder.parameters())
        self._buf = torch.zeros(0, dtype=p.dtype, device=p.device)  # samples of the frame not yet complete
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
            raise ValueError(f"audio chunks must be floating-point torch tensors, {not_a_float_tensor(chunk)}: "
                             f"{self.tok.media.input_scale}")
        if chunk.ndim not in (1, 2, 3) or any(s != 1 for s in chunk.shape[:-1]):
            frames_first = chunk.ndim == 2 and chunk.shape[1] <= 8 < chunk.shape[0]  # (frames, channels), as audio I/O gives
            mix = "chunk.mean(-1): it is (frames, channels)" if frames_first else "chunk.mean(0) for (channels, n)"
            raise ValueError(f"audio chunks must be (n,), (1, n) or (1, 1, n) mono samples, got {tuple(chunk.shape)} "
                             f"(mix channels to mono first: {mix})")
        if chunk.numel():
            self.tok.media.check_range(self.tok.media.input_range(chunk.reshape(1, -1)))
        if carry.compiled(self.tok.encoder):  # compiled since the stream began
            _check_not_compiled(self.tok)
        with _all_or_nothing(self):
            self._buf = torch.cat([self._buf, chunk.reshape(-1).to(self._buf)])
            self.samples_in += chunk.shape[-1]
            return self._emit(self._buf.shape[0] // self.hop)

    def flush(self) -> Tensor:
        """End the stream: zero-pad the last partial frame (as ``tok.encode`` does)
        and return the remaining token frames, ``(frames, *code_shape)`` int64."""
        if self._closed:
            raise ValueError("the stream is already flushed")
        frames = -(-self._buf.shape[0] // self.hop)
        self._buf = torch.cat([self._buf, self._buf.new_zeros(frames * self.hop - self._buf.shape[0])])
        codes = self._emit(frames)
        self._closed = True
        return codes

    def _emit(self, frames: int) -> Tensor:
        """Codes of the next ``frames`` frames of the buffer, ``chunk_frames`` at a time."""
        step, hop, parts = self.tok.config.chunk_frames, self.hop, []
        for f0 in range(0, frames, step):
            x = self._buf[f0 * hop : min(frames, f0 + step) * hop].view(1, 1, -1)
            codes, self._carry = _run_streaming(self._convs, self._carry, lambda x=x: self.tok._encode_aligned(x)[0])
            parts.append(codes)
        self._buf = self._buf[frames * hop :]
        self.frames_out += frames
        if not parts:
            return torch.zeros((0, *self.tok.quantizer.code_shape), dtype=torch.long, device=self._buf.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


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
        self.hop = hop = tok.backbone_config.hop
        self.code_shape = tuple(tok.quantizer.code_shape)
        dec = tok.decoder
        self._convs = _causal_convs(dec)
        self._carry: dict | None = None  # the convs' carried state (backbones.carry)
        self._device = next(dec.parameters()).device
        self._window = dec.window.float()
        n_fft = dec.n_fft
        # the iSTFT's overlap-add in padded time (output sample s = p - n_fft / 2): the sums of
        # the frames so far at p in [frames_in * hop, + n_fft - hop), and the window envelope
        # (the sum of squared windows) of the first frames, whose start has fewer frames over it
        self._tail = torch.zeros(n_fft - hop, device=self._device)
        squares, self._envelope = self._window.square(), torch.zeros(n_fft, device=self._device)
        for t in range(n_fft // hop):  # [0, n_fft - hop): the first frames' start; then one hop of the steady sum
            self._envelope[t * hop :] += squares[: n_fft - t * hop]
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
        codes = codes.long()  # any integer dtype (an export's shards are uint16/uint32)
        cs = self.code_shape
        if codes.ndim == len(cs) + 2 and codes.shape[0] == 1:
            codes = codes[0]
        if codes.ndim != len(cs) + 1 or tuple(codes.shape[1:]) != cs:
            raise ValueError(f"codes must be (n, *{cs}) or (1, n, *{cs}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.tok.codebook_size):
            raise ValueError(f"codes out of range [0, {self.tok.codebook_size})")
        if carry.compiled(self.tok.decoder):  # compiled since the stream began
            _check_not_compiled(self.tok)
        step, parts = self.tok.config.chunk_frames, []
        with _all_or_nothing(self):
            for c in codes.to(self._device).long().split(step):
                parts.append(self._add_frames(c))
        return torch.cat(parts, dim=1) if parts else torch.zeros(1, 0, device=self._device)

    def flush(self, size: int | None = None) -> Tensor:
        """End the stream and return the remaining samples, ``(1, m)`` float32.

        Args:
            size: total samples of the decoded stream (e.g. the encoder stream's
                ``samples_in``), cropping the last frame's padding as
                ``tok.decode(codes, size=(size,))`` does; ``None`` keeps all
                ``frames_in * hop``.

        Raises:
            ValueError: ``size`` is not a whole number, is below the samples already returned, or
                does not end in the last frame received (frames lost on the way, as ``decode``
                refuses codes that do not fit a size; the stream stays open).
        """
        if self._closed:
            raise ValueError("the stream is already flushed")
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
            raise ValueError(f"size must be a whole number of samples, got {size!r}")
        end = self.frames_in * self.hop if size is None else int(size)
        if end < self.samples_out:
            raise ValueError(f"size={size} is below the {self.samples_out} samples already returned")
        if not (self.frames_in - 1) * self.hop < end <= self.frames_in * self.hop and (end or self.frames_in):
            raise ValueError(f"size={size} does not end in the last of the {self.frames_in} frames received "
                             f"(samples {max(0, self.frames_in - 1) * self.hop + 1}-{self.frames_in * self.hop}): "
                             "were frames lost on the way? (a stream's size is its encoder's samples_in)")
        self._closed = True
        if end == self.samples_out:
            return torch.zeros(1, 0, device=self._device)
        # the tail's samples up to the last frame's end, over the envelope of the frames that
        # reach them (no later frame will): offline istft's division at the end of a signal
        hop, f, squares = self.hop, self.frames_in, self._window.square()
        envelope = torch.zeros_like(self._tail)
        for j in range(1, self._window.shape[0] // hop):  # the frame j hops before frames_in
            if f - j >= 0:
                envelope[: envelope.shape[0] - (j - 1) * hop] += squares[j * hop :]
        start = f * hop - self._window.shape[0] // 2  # the tail's first output sample (n_fft / 2 of padding)
        wav = self._tail / envelope
        return wav[max(0, self.samples_out - start) : end - start].unsqueeze(0)

    def _add_frames(self, codes: Tensor) -> Tensor:
        """Decode ``codes`` (k frames) with the stream's conv state, overlap-add their
        iSTFT frames, and return the samples no later frame reaches."""
        k, hop, n_fft = codes.shape[0], self.hop, self._window.shape[0]
        if k == 0:
            return torch.zeros(1, 0, device=self._device)
        dec = self.tok.decoder

        def spectrum() -> Tensor:  # (n_fft / 2 + 1, k), as the offline decoder's iSTFT takes it
            z = self.tok.quantizer.decode(codes.unsqueeze(0))
            return dec.spectrum(z.movedim(-1, 1).to(next(dec.parameters()).dtype))[0]

        spec, self._carry = _run_streaming(self._convs, self._carry, spectrum)
        frames = torch.fft.irfft(spec, n=n_fft, dim=0).T * self._window  # (k, n_fft)
        p0 = self.frames_in * hop  # padded time of the tail's first sample
        sums = torch.cat([self._tail, self._tail.new_zeros(k * hop)])
        for i in range(k):
            sums[i * hop : i * hop + n_fft] += frames[i]
        done = sums[: k * hop]  # no frame after these reaches them
        self._tail = sums[k * hop :].clone()
        self.frames_in += k
        envelope = self._envelope[p0 : p0 + k * hop]
        if envelope.shape[0] < k * hop:  # past the start: every sample has n_fft / hop frames over it
            steady = self._envelope[n_fft - hop : n_fft].repeat(k + 1)
            envelope = torch.cat([envelope, steady[(p0 + envelope.shape[0]) % hop :]])[: k * hop]
        wav = done / envelope
        first = p0 - n_fft // 2  # output sample of done[0]; the first n_fft / 2 are the padding
        out = wav[max(0, -first) :]
        self.samples_out += out.shape[0]
        return out.unsqueeze(0)
