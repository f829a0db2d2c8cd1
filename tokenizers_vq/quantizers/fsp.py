"""FSP: finite scalar perturbation (arXiv 2602.17133).

A scalar quantizer like FSQ with two changes. Each of the ``len(levels)`` channels is mapped
into ``(0, 1)`` by a CDF (``cdf=``: ``"tanh"`` ``(tanh(x) + 1) / 2``, the logistic CDF of scale
1/2; ``"sigmoid"``, ``"normal"``, ``"laplace"``, ``"cauchy"``) and cut into ``L_i`` equal bins;
a code's value is its bin's midpoint ``(i + 1/2) / L_i``, handed to the decoder standardised
(``(v - 1/2) sqrt(12)``: variance ``1 - 1/L^2`` for values spread evenly over the bins) or, with
``inverse_cdf=True``, taken back through the inverse CDF (clamped to ``[1e-6, 1 - 1e-6]``). And in
training each value is, with probability ``perturb``, replaced by its CDF value moved by uniform
noise of up to half a bin either way (kept where it stays inside ``(0, 1)``; near a bin's edge it
may cross into the next bin, whose code it does not take): the decoder learns around the
midpoints, and the gradient is the CDF's own there. ``perturb=1`` (always) is the reference
implementation's default.

The bins are used evenly when the latent follows the CDF's own distribution, so a loss pulls
each channel's batch mean to 0 and its variance to that distribution's (pi^2/12 for tanh, pi^2/3
for the sigmoid, 1 for the normal, 2 for the Laplace; the Cauchy has none, so only the mean
there), with the weights 0.1 and 0.07 of the reference implementation (``moments`` loss). The
reference pulls the variance to tanh's pi^2/12 whatever the CDF unless told otherwise, and also
offers skewness and kurtosis terms, which are not here. With one position the variance term is
left out (there is no spread to measure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import code_histogram, perplexity, straight_through
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_choice, check_number, load_settings
from tokenizers_vq.quantizers.fsq import check_levels

_SQRT2 = math.sqrt(2.0)
# name -> (CDF, inverse CDF, the variance of the CDF's distribution or None)
CDFS = {
    "tanh": (lambda x: (torch.tanh(x) + 1) / 2, lambda p: torch.atanh(2 * p - 1), math.pi**2 / 12),
    "sigmoid": (torch.sigmoid, torch.logit, math.pi**2 / 3),
    "normal": (lambda x: (1 + torch.erf(x / _SQRT2)) / 2, lambda p: torch.erfinv(2 * p - 1) * _SQRT2, 1.0),
    "laplace": (lambda x: 0.5 + 0.5 * torch.sign(x) * (1 - torch.exp(-x.abs())),
                lambda p: -torch.sign(p - 0.5) * torch.log1p(-2 * (p - 0.5).abs()), 2.0),
    "cauchy": (lambda x: torch.atan(x) / math.pi + 0.5, lambda p: torch.tan((p - 0.5) * math.pi), None),
}
_NAMES = tuple(CDFS)


class FSP(Quantizer):
    """``(B, *S, D) -> codes (B, *S)`` with codes in ``[0, prod(levels))``.

    Args:
        dim: latent size ``D``; projected to ``len(levels)`` channels (and back) when it differs.
        levels: bins per channel, e.g. ``[8, 5, 5, 5]`` (1000 codes), each in ``[2, 2^24]``.
        cdf: ``"tanh"`` (default), ``"sigmoid"``, ``"normal"``, ``"laplace"`` or ``"cauchy"``.
        perturb: probability, in training, of the CDF value moved by up to half a bin instead
            of its bin's midpoint (module docstring).
        inverse_cdf: hand the decoder the inverse CDF of the midpoints instead of the
            standardised midpoints.
        mean_weight, var_weight: weights of the ``moments`` loss's two terms (the latent's
            batch mean against 0, its variance against the CDF's distribution's); ``var_weight``
            defaults to 0.07, and to 0 for the Cauchy CDF (no variance).
        check_finite: see :class:`Quantizer`.

    Example:
        >>> fsp = FSP(dim=16, levels=[8, 5, 5, 5])
        >>> out = fsp(torch.randn(4, 100, 16))
        >>> fsp.codebook_size, out.codes.shape, sorted(out.losses)
        (1000, torch.Size([4, 100]), ['moments'])
    """

    def __init__(self, dim: int, levels: Sequence[int], cdf: str = "tanh", perturb: float = 1.0,
                 inverse_cdf: bool = False, mean_weight: float = 0.1, var_weight: float | None = None,
                 check_finite: bool = True):
        super().__init__(dim, check_finite)
        levels = check_levels(levels)
        check_choice("cdf", cdf, _NAMES)
        check_number("perturb", perturb, 0, 1)
        var_weight = (0.0 if CDFS[cdf][2] is None else 0.07) if var_weight is None else var_weight
        for name, value in (("mean_weight", mean_weight), ("var_weight", var_weight)):
            check_number(name, value, 0)
        if CDFS[cdf][2] is None and var_weight > 0:
            raise ValueError(f"the {cdf} distribution has no variance to pull the latent's to: set var_weight=0")
        self.levels, self.cdf, self.perturb, self.inverse_cdf = levels, cdf, perturb, inverse_cdf
        self.mean_weight, self.var_weight = mean_weight, var_weight
        c = len(levels)
        self.project_in = nn.Linear(dim, c) if dim != c else nn.Identity()
        self.project_out = nn.Linear(c, dim) if dim != c else nn.Identity()
        lv = torch.tensor(levels, dtype=torch.int64)
        self.register_buffer("_levels", lv)  # kept with the weights: the codes' meaning, checked at load
        self.register_buffer("_cdf", torch.tensor(_NAMES.index(cdf)))
        self.register_buffer("_inverse_cdf", torch.tensor(bool(inverse_cdf)))
        self.register_buffer("_basis", torch.cumprod(torch.cat([lv.new_ones(1), lv[:-1]]), 0), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_settings(self, state_dict, prefix, {"_levels": list, "_inverse_cdf": bool, "_cdf": _NAMES})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _bins(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(p, digits, codes)`` of a projected latent: CDF values in ``[0, 1]``, each
        channel's bin in ``[0, L_i)`` and the code of each position (NaN: bin 0)."""
        p = CDFS[self.cdf][0](x.float())
        lv = self._levels.float()
        digits = torch.minimum(torch.floor(p.detach().nan_to_num(0.0) * lv), lv - 1).clamp_min(0)
        return p, digits, (digits.long() * self._basis).sum(-1)

    def _values(self, v: Tensor, x: Tensor | None = None) -> Tensor:
        """What the decoder gets of bin values ``v`` in ``(0, 1)``; with ``inverse_cdf`` the
        gradient passes straight through to the projected latent ``x`` (when given)."""
        if not self.inverse_cdf:
            return (v - 0.5) * math.sqrt(12.0)
        back = CDFS[self.cdf][1](v.detach().clamp(1e-6, 1 - 1e-6))
        return back if x is None else straight_through(x, back)

    def _codes(self, z: Tensor) -> Tensor:
        x = self.project_in(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._bins(x)[2]

    def _forward(self, z: Tensor) -> QuantizerOutput:
        x = self.project_in(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            xf = x.float()
            p, digits, codes = self._bins(xf)
            v = straight_through(p, (digits + 0.5) / self._levels.float())
            if self.training and self.perturb > 0:
                moved = p + (torch.rand_like(p) * 2 - 1) / (2 * self._levels.float())
                moved = torch.where((moved > 0) & (moved < 1), moved, p)
                v = moved if self.perturb >= 1 else torch.where(torch.rand_like(p) < self.perturb, moved, v)
            xq = self._values(v, xf).to(x.dtype)
            rows = xf.reshape(-1, xf.shape[-1])
            var, mean = torch.var_mean(rows, dim=0, correction=1 if rows.shape[0] > 1 else 0)
            moments = self.mean_weight * mean.square().mean()
            if self.var_weight > 0 and rows.shape[0] > 1:
                moments = moments + self.var_weight * (var - CDFS[self.cdf][2]).square().mean()
            metrics = {}
            if self.codebook_size <= 2**24:  # a histogram of every code
                counts = code_histogram(codes, self.codebook_size)
                metrics = {"perplexity": perplexity(counts), "usage_batch": (counts > 0).float().mean()}
        quantized = self.project_out(xq).to(z.dtype)
        return QuantizerOutput(quantized, codes, {"moments": moments}, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        digits = (codes.long().unsqueeze(-1) // self._basis) % self._levels
        v = (digits.float() + 0.5) / self._levels.float()
        return self._project_out(self._values(v))
