"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization:
VQ-VAE Made Simple").

Each of the ``len(levels)`` channels is bounded to ``L_i`` values and rounded; the
implicit codebook is the product grid (``prod(levels)`` codes), which is never
materialised: codes and indices convert by mixed radix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import code_histogram, perplexity, straight_through
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput


class FSQ(Quantizer):
    """``(B, *S, D) -> codes (B, *S)`` with codes in ``[0, prod(levels))``.

    Args:
        dim: latent size ``D``; projected to ``len(levels)`` channels (and back)
            when it differs.
        levels: number of values per channel, e.g. ``[8, 5, 5, 5]`` (1000 codes).
        usage_metrics: also return perplexity and the fraction of codes used in
            the batch (a ``prod(levels)`` histogram, so only for grids up to 2^24).
        check_finite: see :class:`Quantizer`.

    Example:
        >>> fsq = FSQ(dim=16, levels=[8, 5, 5, 5])
        >>> fsq.codebook_size
        1000
        >>> fsq(torch.randn(4, 100, 16)).codes.shape
        torch.Size([4, 100])
    """

    def __init__(
        self, dim: int, levels: Sequence[int], usage_metrics: bool = True, check_finite: bool = True
    ):
        super().__init__(dim, check_finite)
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"levels must be a non-empty list of integers >= 2, got {levels}")
        if sum(math.log2(v) for v in levels) > 62:
            raise ValueError(f"prod(levels) = 2^{sum(math.log2(v) for v in levels):.1f} does not fit int64 codes")
        self.levels = levels
        self.usage_metrics = usage_metrics and math.prod(levels) <= 2**24
        c = len(levels)
        self.project_in = nn.Linear(dim, c) if dim != c else nn.Identity()
        self.project_out = nn.Linear(c, dim) if dim != c else nn.Identity()
        lv = torch.tensor(levels, dtype=torch.int64)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), 0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, x: Tensor) -> Tensor:
        """Squash ``x`` so that rounding gives exactly ``L_i`` values per channel.

        ``tanh(x + shift) * h - offset`` with ``h = (L-1)(1+eps)/2``; for even ``L``
        the half-step ``offset = 1/2`` and ``shift = atanh(offset / h)`` keep the
        values symmetric about 0 and ``x = 0`` mapped to 0 before the offset.
        """
        lv = self._levels.float()
        half = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(x + shift) * half - offset

    def _forward(self, z: Tensor) -> QuantizerOutput:
        x = self.project_in(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self.bound(x.float())
            rounded = straight_through(bounded, torch.round(bounded))
            width = (self._levels // 2).float()
            xq = (rounded / width).to(x.dtype)
            digits = (torch.round(bounded.detach()).nan_to_num(0.0) + width).long()  # NaN (check_finite off): the centre
            codes = (digits * self._basis).sum(-1)
            metrics = {}
            if self.usage_metrics:
                counts = code_histogram(codes, self.codebook_size)
                metrics = {"perplexity": perplexity(counts), "usage_batch": (counts > 0).float().mean()}
        quantized = self.project_out(xq).to(z.dtype)
        return QuantizerOutput(quantized, codes, {}, metrics)

    def codes_to_digits(self, codes: Tensor) -> Tensor:
        """Indices ``(...)`` -> per-channel values ``(..., C)`` in ``[0, L_i)``."""
        return (codes.long().unsqueeze(-1) // self._basis) % self._levels

    def _decode(self, codes: Tensor) -> Tensor:
        width = (self._levels // 2).float()
        centred = (self.codes_to_digits(codes).float() - width) / width
        return self.project_out(centred)
