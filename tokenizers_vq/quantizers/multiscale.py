"""Multi-scale residual quantization, as the VAR tokenizer does it.

Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction" (arXiv 2404.02905). A 2-D latent ``(B, H, W, D)`` is coded as token
maps of growing size (e.g. 1x1, 2x2, 3x3, ... HxW) with one shared codebook: at scale
``k`` the residual is area-downsampled to ``h_k x w_k``, quantized, upsampled back
(bicubic), refined by a small convolution ``phi`` (``0.5 h + 0.5 phi(h)``, VAR's
``quant_resi``) and subtracted; the quantized latent is the sum over scales. A next-scale
AR model predicts map ``k`` from maps ``< k``.

Codes keep the contract's one-tensor shape: ``(B, *S, K)``, entry ``k`` at a position
being the code of the scale-``k`` cell that covers it (repeated over the cell);
:meth:`MultiScaleResidualQuantizer.scale_codes` gives the compact maps, the tokens a
next-scale model predicts, and :meth:`~MultiScaleResidualQuantizer.num_tokens` counts
them (rates count those, not the repeated codes; a token export stores the repeated ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import check_codeword_outputs, straight_through
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_number, load_settings
from tokenizers_vq.quantizers.vq import VectorQuantizer


class MultiScaleResidualQuantizer(Quantizer):
    """``(B, *S, D) -> codes (B, *S, len(scales))`` over one shared VQ codebook; ``S`` has
    1, 2 or 3 axes (sequence, image, video latent).

    Args:
        dim: latent size ``D``.
        codebook_size: codes of the shared codebook.
        scales: side of each scale's map relative to the largest (the last, which is the
            latent's own size); a latent axis of ``n`` positions gets
            ``max(1, round(s * n / scales[-1]))`` cells at scale ``s``.
        beta: weight of the commitment loss ``|z - sg(f)|^2`` of the summed latent ``f``
            (``|sg(z) - f|^2`` trains ``phi``).
        vq_options: further :class:`VectorQuantizer` options of the shared codebook
            (e.g. ``codebook_dim``, ``metric``); its EMA statistics see every scale.
        check_finite: see :class:`Quantizer`.

    ``phi`` here is a position-wise linear map (VAR's is a 3x3 convolution), so that one
    quantizer serves latents of any rank.

    Example:
        >>> q = MultiScaleResidualQuantizer(dim=16, codebook_size=256, scales=(1, 2, 4, 8))
        >>> codes = q.encode(torch.randn(2, 8, 8, 16))
        >>> codes.shape, [tuple(c.shape[1:]) for c in q.scale_codes(codes)]
        (torch.Size([2, 8, 8, 4]), [(1, 1), (2, 2), (4, 4), (8, 8)])
    """

    positionwise = False  # each scale's cell covers several positions
    _UPSAMPLE = {1: "linear", 2: "bicubic", 3: "trilinear"}

    def __init__(self, dim: int, codebook_size: int, scales: Sequence[int] = (1, 2, 3, 4, 6, 8, 10, 13, 16),
                 beta: float = 0.25, vq_options: dict | None = None, check_finite: bool = True):
        super().__init__(dim, check_finite)
        if (isinstance(scales, (str, bytes)) or not hasattr(scales, "__len__") or len(scales) == 0
                or any(isinstance(s, bool) or not float(s).is_integer() for s in scales)
                or min(scales) < 1 or list(scales) != sorted(set(scales))):  # no fractions, no repeats
            raise ValueError(f"scales must be strictly increasing whole sizes >= 1, got {scales!r}")
        scales = [int(s) for s in scales]
        check_number("beta", beta, 0)
        self.scales, self.beta = scales, beta
        self.register_buffer("_scales", torch.tensor(scales))  # in the state dict: see load_settings
        self.vq = VectorQuantizer(dim, codebook_size, check_finite=False, **(vq_options or {}))
        check_codeword_outputs([self.vq], "MultiScaleResidualQuantizer")
        self.phi = nn.Linear(dim, dim)
        with torch.no_grad():  # starts as the identity: 0.5 h + 0.5 phi(h) = h
            self.phi.weight.copy_(torch.eye(dim))
            self.phi.bias.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_settings(self, state_dict, prefix, {"_scales": list})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def codebook_size(self) -> int:
        return self.vq.codebook_size

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (len(self.scales),)

    def num_tokens(self, grid: Sequence[int]) -> int:
        """The tokens of the scale maps (codes repeat each cell's code over its positions)."""
        return sum(math.prod(g) for g in self.grids(grid))

    def grids(self, size: Sequence[int]) -> list[tuple[int, ...]]:
        """Each scale's map for a latent of ``size`` positions per axis."""
        top = self.scales[-1]
        return [tuple(max(1, round(s * n / top)) for n in size) for s in self.scales]

    def _up(self, q: Tensor, size: tuple[int, ...]) -> Tensor:
        """A scale's quantized map ``(B, D, *grid)`` at the latent's size, then
        ``0.5 h + 0.5 phi(h)``; channels-last out."""
        if tuple(q.shape[2:]) != size:
            q = F.interpolate(q, size=size, mode=self._UPSAMPLE[len(size)], align_corners=False)
        h = q.movedim(1, -1)
        return 0.5 * h + 0.5 * self.phi(h)

    def _forward(self, z: Tensor) -> QuantizerOutput:
        size = tuple(z.shape[1:-1])
        if not 1 <= len(size) <= 3:
            raise ValueError(f"MultiScaleResidualQuantizer needs at least one spatial axis and at most 3 (latents "
                             f"(B, *S, D) with 1-3 position axes); got shape {tuple(z.shape)}")
        residual, f = z.detach(), torch.zeros_like(z)
        codes, losses, metrics, pool = [], {}, {}, []
        grids = self.grids(size)
        if self.training and not self.vq._initted:  # k-means over the latent at every scale, not the 1x1 map alone
            rows = torch.cat([self.vq._rows(_area(z.detach(), g, size))[1] for g in grids])
            with torch.autocast(z.device.type, enabled=False):  # fp32, as the VQ's own k-means
                self.vq._kmeans(rows)
        for k, grid in enumerate(grids):
            part = _area(residual, grid, size)
            out = self.vq._forward(self.vq._in_weight_dtype(part), pool)
            up = self._up(out.quantized.detach().to(part.dtype).movedim(-1, 1), size)
            f = f + up
            residual = residual - up.detach()
            codes.append(_gather(out.codes, [torch.arange(n, device=z.device) * g // n for n, g in zip(size, grid)]))
            losses.update({f"{name}_scale{k}": v for name, v in out.losses.items()})
            metrics.update({f"{name}_scale{k}": v for name, v in out.metrics.items()})
        if pool:  # one codebook update per step from every scale's rows: statistics and dead-code restarts
            rows, counts, sums = zip(*pool)  # see all of them (restarts from the 1x1 map alone would collapse the codebook)
            self.vq._update(torch.cat(rows), sum(counts), None if sums[0] is None else sum(sums), metrics)
        losses["commitment"] = self.beta * F.mse_loss(z, f.detach())
        losses["refine"] = F.mse_loss(f, z.detach())
        return QuantizerOutput(straight_through(z, f), torch.stack(codes, dim=-1), losses, metrics)

    def scale_codes(self, codes: Tensor) -> list[Tensor]:
        """The compact code map of each scale, ``(B, *grid_k)``, from codes ``(B, *S, K)``."""
        size = tuple(codes.shape[1:-1])
        maps = []
        for k, grid in enumerate(self.grids(size)):
            # position ceil(i n / g) lies inside cell i (the nearest-cell spread puts cell i there)
            picks = [(torch.arange(g, device=codes.device) * n + g - 1) // g for n, g in zip(size, grid)]
            maps.append(_gather(codes[..., k], picks))
        return maps

    def _decode(self, codes: Tensor) -> Tensor:
        size = tuple(codes.shape[1:-1])
        if not 1 <= len(size) <= 3:
            raise ValueError(f"MultiScaleResidualQuantizer needs at least one spatial axis and at most 3: codes "
                             f"(B, *S, scales) with 1-3 position axes, as forward gives them; got shape {tuple(codes.shape)}")
        f = None
        for c in self.scale_codes(codes):
            up = self._up(self.vq._in_weight_dtype(self.vq._decode(c)).movedim(-1, 1), size)  # checked by decode; forward's dtype
            f = up if f is None else f + up
        return f


def _area(x: Tensor, grid: tuple[int, ...], size: tuple[int, ...]) -> Tensor:
    """Channels-last ``x`` ``(B, *size, D)`` area-averaged to ``(B, *grid, D)``."""
    return x if grid == size else F.interpolate(x.movedim(-1, 1), size=grid, mode="area").movedim(1, -1)


def _gather(c: Tensor, picks: list[Tensor]) -> Tensor:
    """``c`` ``(B, *grid)`` at the given indices along each grid axis."""
    for axis, idx in enumerate(picks, start=1):
        c = c.index_select(axis, idx)
    return c
