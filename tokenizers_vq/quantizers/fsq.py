"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization:
VQ-VAE Made Simple").

Each of the ``len(levels)`` channels is bounded to ``L_i`` values and rounded; the
implicit codebook is the product grid (``prod(levels)`` codes), which is never
materialised: codes and indices convert by mixed radix.

Three bounds (``bound=``): ``"tanh"`` (default) squashes with ``(1 + eps)`` and an
``atanh`` shift, the form vector-quantize-pytorch uses, so that every one of the ``L``
values is reached inside the squashing; ``"paper"`` is the formula of the paper's
appendix (``(1 - eps)`` and a ``tan`` shift), which keeps the extreme values of an even
``L`` a hair out of reach of finite inputs (on standard-normal inputs 0.6-1.8% of vectors
get another code than with ``"tanh"`` on grids of 3-6 levels of 5-8 values;
``tests/quantizers/test_fsq_options.py`` measures it; for ``L = 2`` its ``tan`` shift moves
the split from 0 to -1.56, so about half of the vectors differ: use another bound there); ``"symmetric"`` (Parker et al. 2024, arXiv 2411.19842) spaces the ``L`` values evenly
over ``[-1, 1]`` including both ends, with no half-step offset for even ``L``.
``noise_dropout=p`` (the same paper) replaces the rounding of each value, with
probability ``p`` during training, by uniform noise of one step's width: the decoder
learns around the grid and the gradient is exact there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import code_histogram, perplexity, straight_through
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_number, load_settings


_BOUNDS = ("tanh", "paper", "symmetric")


def check_levels(levels: Sequence[int]) -> list[int]:
    """``levels`` as a list of ints (values per channel of a scalar grid), or a ValueError naming
    what is wrong: not a list of whole numbers >= 2, one over 2^24, a product past int64."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__len__"):  # (not '855' for [8, 5, 5])
        raise ValueError(f"levels must be a non-empty list of integers >= 2, got {levels!r}")
    if any(isinstance(v, bool) or not float(v).is_integer() for v in levels):
        raise ValueError(f"levels must be a non-empty list of integers >= 2, got {list(levels)}")
    levels = [int(v) for v in levels]
    if not levels or min(levels) < 2:
        raise ValueError(f"levels must be a non-empty list of integers >= 2, got {levels}")
    if max(levels) > 2**24:
        raise ValueError(f"levels must each be at most 2^24 = {2**24} (the bounded values are float32, which "
                         f"cannot tell apart steps beyond), got {max(levels)}: split that channel into two")
    if sum(math.log2(v) for v in levels) > 62:
        raise ValueError(f"prod(levels) = 2^{sum(math.log2(v) for v in levels):.1f} does not fit int64 codes: "
                         "use fewer or smaller levels")
    return levels


class FSQ(Quantizer):
    """``(B, *S, D) -> codes (B, *S)`` with codes in ``[0, prod(levels))``.

    Args:
        dim: latent size ``D``; projected to ``len(levels)`` channels (and back)
            when it differs.
        levels: number of values per channel, e.g. ``[8, 5, 5, 5]`` (1000 codes), each in
            ``[2, 2^24]`` (the bounded values are float32, exact for whole numbers up to 2^24).
        usage_metrics: also return perplexity and the fraction of codes used in
            the batch (a ``prod(levels)`` histogram, so only for grids up to 2^24).
        bound: ``"tanh"`` (default), ``"paper"`` or ``"symmetric"`` (module docstring).
        noise_dropout: probability, in training, of uniform noise instead of rounding.
        check_finite: see :class:`Quantizer`.

    Example:
        >>> fsq = FSQ(dim=16, levels=[8, 5, 5, 5])
        >>> fsq.codebook_size
        1000
        >>> fsq(torch.randn(4, 100, 16)).codes.shape
        torch.Size([4, 100])
    """

    def __init__(
        self, dim: int, levels: Sequence[int], usage_metrics: bool = True, bound: str = "tanh",
        noise_dropout: float = 0.0, check_finite: bool = True,
    ):
        super().__init__(dim, check_finite)
        if bound not in _BOUNDS:
            raise ValueError(f"bound must be 'tanh', 'paper' or 'symmetric', got {bound!r}")
        check_number("noise_dropout", noise_dropout, 0, 1)
        self.bound_form, self.noise_dropout = bound, noise_dropout
        self.levels = levels = check_levels(levels)
        self.usage_metrics = usage_metrics and math.prod(levels) <= 2**24
        c = len(levels)
        self.project_in = nn.Linear(dim, c) if dim != c else nn.Identity()
        self.project_out = nn.Linear(c, dim) if dim != c else nn.Identity()
        lv = torch.tensor(levels, dtype=torch.int64)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), 0)
        # the levels and the bound in the state dict: weights saved with another grid refuse to load
        self.register_buffer("_levels", lv)
        self.register_buffer("_bound", torch.tensor(_BOUNDS.index(bound)))
        self.register_buffer("_basis", basis, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_settings(self, state_dict, prefix, {"_levels": list, "_bound": _BOUNDS})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, x: Tensor) -> Tensor:
        """Squash ``x`` so that rounding gives exactly ``L_i`` values per channel, in
        units of one step, centred as the digits are (``digit = round(bound) + L // 2``).

        ``"tanh"``: ``tanh(x + shift) * h - offset`` with ``h = (L-1)(1+eps)/2``; for even
        ``L`` the half-step ``offset = 1/2`` and ``shift = atanh(offset / h)`` keep the
        values symmetric about 0 and ``x = 0`` mapped to 0 before the offset. ``"paper"``:
        ``h = (L-1)(1-eps)/2`` and ``shift = tan(offset / h)``. ``"symmetric"``:
        ``(tanh(x) + 1) (L-1) / 2 - L // 2``.
        """
        lv = self._levels.float()
        if self.bound_form == "symmetric":
            return (torch.tanh(x) + 1) * (lv - 1) / 2 - (self._levels // 2).float()
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        if self.bound_form == "paper":
            half = (lv - 1) * (1 - 1e-3) / 2
            shift = torch.tan(offset / half)
        else:
            half = (lv - 1) * (1 + 1e-3) / 2
            shift = torch.atanh(offset / half)
        return torch.tanh(x + shift) * half - offset

    def _values(self, steps: Tensor) -> Tensor:
        """Per-channel values in model space of ``steps`` (digits minus ``L // 2``)."""
        width = (self._levels // 2).float()
        if self.bound_form == "symmetric":  # L values evenly over [-1, 1], ends included
            return (steps + width) * 2 / (self._levels.float() - 1) - 1
        return steps / width

    def _steps(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(bounded, steps, codes)`` of a projected latent ``x``: the bounded fp32 values,
        their levels centred on 0 (rounded and clamped: the tanh bound overshoots half a
        step from L = 1001) and the code of each position."""
        bounded = self.bound(x.float())
        width = (self._levels // 2).float()
        steps = torch.minimum(torch.maximum(torch.round(bounded), -width), self._levels.float() - 1 - width)
        digits = (steps.detach().nan_to_num(0.0) + width).long()  # NaN (check_finite off): the centre
        return bounded, steps, (digits * self._basis).sum(-1)

    def _codes(self, z: Tensor) -> Tensor:
        x = self.project_in(z)  # under the caller's autocast, as in _forward
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._steps(x)[2]

    def _forward(self, z: Tensor) -> QuantizerOutput:
        x = self.project_in(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded, steps, codes = self._steps(x)
            rounded = straight_through(bounded, steps)
            if self.training and self.noise_dropout > 0:
                noisy = bounded + torch.rand_like(bounded) - 0.5
                rounded = torch.where(torch.rand_like(bounded) < self.noise_dropout, noisy, rounded)
            xq = self._values(rounded).to(x.dtype)
            metrics = {}
            if self.usage_metrics:
                counts = code_histogram(codes, self.codebook_size)
                metrics = {"perplexity": perplexity(counts), "usage_batch": (counts > 0).float().mean()}
        quantized = self.project_out(xq).to(z.dtype)
        return QuantizerOutput(quantized, codes, {}, metrics)

    def unrounded(self, z: Tensor) -> Tensor:
        """``(B, *S, D) -> (B, *S, D)``: what ``forward(z).quantized`` would be without the
        rounding (the bounded latent projected back): the decoder's input with unlimited
        levels per channel, to measure what the rounding itself costs."""
        x = self.project_in(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            xq = self._values(self.bound(x.float())).to(x.dtype)
        return self.project_out(xq).to(z.dtype)

    def codes_to_digits(self, codes: Tensor) -> Tensor:
        """Indices ``(...)`` -> per-channel values ``(..., C)`` in ``[0, L_i)``; codes outside
        ``[0, codebook_size)`` are refused, as :meth:`decode` refuses them."""
        return self._digits(self._check_codes(codes.reshape(-1)).reshape(codes.shape) if codes.numel() else codes)

    def _digits(self, codes: Tensor) -> Tensor:
        return (codes.long().unsqueeze(-1) // self._basis) % self._levels

    def _decode(self, codes: Tensor) -> Tensor:
        width = (self._levels // 2).float()
        return self._project_out(self._values(self._digits(codes).float() - width))
