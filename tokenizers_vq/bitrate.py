"""Bits per token and the real size of an entropy-coded token stream.

No entropy-coding package is a dependency (``constriction`` is not installed in our
environments), so this module carries a small static rANS coder (Duda 2013,
"Asymmetric numeral systems"): the symbol counts go in a header, the payload costs
about ``-log2 p(s)`` bits per token under those counts, i.e. the empirical entropy.
It is pure Python (about a million tokens per few seconds): meant for measuring
rates and for files of tokens, not for a training loop.

Stream layout (all integers LEB128 varints): ``n_tokens, alphabet, n_distinct``,
then ``n_distinct`` pairs ``(symbol - previous symbol, count)``, then the rANS
payload (its final 5-byte state first).
"""

from __future__ import annotations

import bisect
import math
import zlib

import numpy as np
import torch
from torch import Tensor

_STATE_LOW = 1 << 31  # rANS state lives in [2^31, 2^39); renormalised a byte at a time
_STATE_BYTES = 5
_MAX_PROB_BITS = 24


def entropy_bits(tokens: Tensor) -> float:
    """Empirical (order-0) entropy of ``tokens`` in bits per token."""
    _, counts = torch.unique(tokens.reshape(-1), return_counts=True)
    p = counts.double() / counts.sum()
    return max(0.0, float(-(p * p.log2()).sum()))  # one symbol, or none: 0, not -0.0


def bits_per_pixel(num_bytes: int, num_pixels: int) -> float:
    """``8 * num_bytes / num_pixels``."""
    return 8.0 * num_bytes / num_pixels


def kbps(num_bytes: int, seconds: float) -> float:
    """Kilobits per second of ``num_bytes`` for ``seconds`` of media."""
    return 8.0 * num_bytes / seconds / 1000.0


def zlib_size(tokens: Tensor, alphabet: int) -> int:
    """Bytes of ``tokens`` as fixed-width little-endian integers after zlib level 9."""
    width = np.uint8 if alphabet <= 2**8 else np.uint16 if alphabet <= 2**16 else np.uint32
    return len(zlib.compress(tokens.reshape(-1).cpu().numpy().astype(width).tobytes(), 9))


# -- varints --------------------------------------------------------------------------------
def _put(out: bytearray, v: int) -> None:
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return


def _get(data: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated token stream header")
        b = data[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, pos


# -- frequency model ------------------------------------------------------------------------
def _quantize(counts: list[int]) -> tuple[int, list[int]]:
    """Counts -> frequencies summing to ``2^bits`` with every symbol >= 1, by the
    same deterministic rule on both sides."""
    total = sum(counts)
    bits = min(_MAX_PROB_BITS, max(12, math.ceil(math.log2(max(total, 2))) + 1))
    m = 1 << bits
    if len(counts) > m // 2:
        raise ValueError(f"{len(counts)} distinct symbols exceed the coder's frequency precision")
    freqs = [max(1, c * m // total) for c in counts]
    excess = sum(freqs) - m
    order = sorted(range(len(freqs)), key=lambda i: -freqs[i])
    if excess < 0:  # give to the most frequent symbols, one unit each in turn
        for i in range(-excess):
            freqs[order[i % len(order)]] += 1
    active = order  # take from the most frequent symbols that keep at least 1, one unit each in turn
    while excess > 0:  # (whole passes at once: a unit per pass over every symbol took 17 s for one
        active = [j for j in active if freqs[j] > 1]  # common code among 20,000 seen once)
        passes = min(excess // len(active), min(freqs[j] for j in active) - 1)
        for j in active if passes else active[:excess]:
            freqs[j] -= max(passes, 1)
        excess -= passes * len(active) if passes else min(excess, len(active))
    return bits, freqs


def encode_tokens(tokens: Tensor, alphabet: int) -> bytes:
    """Entropy-code ``tokens`` (any shape, values in ``[0, alphabet)``) with static rANS.

    Returns:
        The self-contained byte stream (header + payload); :func:`decode_tokens`
        returns the flattened tokens.
    """
    if isinstance(alphabet, bool) or not isinstance(alphabet, int) or alphabet < 1:
        raise ValueError(f"alphabet must be a whole number >= 1 (the codebook size), got {alphabet!r}")
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    flat = tokens.reshape(-1).long().cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= alphabet):
        raise ValueError(f"tokens must lie in [0, {alphabet}), found [{int(flat.min())}, {int(flat.max())}]")
    symbols, counts = torch.unique(flat, return_counts=True)
    symbols, counts = symbols.tolist(), counts.tolist()
    out = bytearray()
    for v in (flat.numel(), alphabet, len(symbols)):
        _put(out, v)
    prev = 0
    for s, c in zip(symbols, counts):
        _put(out, s - prev)
        _put(out, c)
        prev = s
    if not symbols:
        return bytes(out)
    bits, freqs = _quantize(counts)
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    rank = dict(zip(symbols, range(len(symbols))))
    payload = bytearray()
    x = _STATE_LOW
    base = (_STATE_LOW >> bits) << 8
    for s in reversed(flat.tolist()):  # rANS is last-in first-out
        r = rank[s]
        f = freqs[r]
        x_max = base * f
        while x >= x_max:
            payload.append(x & 0xFF)
            x >>= 8
        x = ((x // f) << bits) + (x % f) + cum[r]
    for _ in range(_STATE_BYTES):
        payload.append(x & 0xFF)
        x >>= 8
    payload.reverse()
    return bytes(out + payload)


def decode_tokens(data: bytes) -> Tensor:
    """Inverse of :func:`encode_tokens`: the flattened int64 tokens.

    A damaged payload, an appended or cut stream, and a header whose symbols repeat, leave the
    alphabet or do not add up to the count are refused. The stream carries no checksum (it
    measures coded sizes; token files carry digests): a damaged symbol gap that keeps the
    symbols increasing and inside the alphabet decodes to other symbols."""
    n, pos = _get(data, 0)
    alphabet, pos = _get(data, pos)
    n_sym, pos = _get(data, pos)
    symbols, counts, prev = [], [], 0
    for i in range(n_sym):
        d, pos = _get(data, pos)
        c, pos = _get(data, pos)
        if (i and d == 0) or c == 0:  # the encoder writes each present symbol once, in increasing order
            raise ValueError("corrupt token stream header: a symbol repeated or of no count")
        prev += d
        symbols.append(prev)
        counts.append(c)
    if alphabet < 1 or sum(counts) != n or (symbols and symbols[-1] >= alphabet):
        raise ValueError("corrupt token stream header")
    if n == 0:
        if pos != len(data):
            raise ValueError("corrupt token stream: bytes after an empty stream's header")
        return torch.zeros(0, dtype=torch.int64)
    bits, freqs = _quantize(counts)
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    mask = (1 << bits) - 1
    if len(data) < pos + _STATE_BYTES:
        raise ValueError("truncated token stream payload")
    x = int.from_bytes(data[pos : pos + _STATE_BYTES], "big")
    pos += _STATE_BYTES
    out = [0] * n
    for i in range(n):
        slot = x & mask
        r = bisect.bisect_right(cum, slot) - 1
        out[i] = symbols[r]
        x = freqs[r] * (x >> bits) + slot - cum[r]
        while x < _STATE_LOW:
            if pos >= len(data):
                raise ValueError("truncated token stream payload")
            x = (x << 8) | data[pos]
            pos += 1
    if x != _STATE_LOW or pos != len(data):  # the encoder started from _STATE_LOW and wrote nothing after
        raise ValueError("corrupt token stream payload: it does not decode back to the coder's start state "
                         "(a damaged or appended stream)")
    return torch.tensor(out, dtype=torch.int64)
