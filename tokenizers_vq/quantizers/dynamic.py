"""Dynamic-length coding over any quantizer, for 1D, 2D and 3D latents (Huang et al.
2023, DQ-VAE: "Towards Accurate Image Coding: Improved Autoregressive Image
Generation with Dynamic Vector Quantization").

The latent ``(B, *S, D)`` is cut into regions of 2 (audio), 2x2 (image) or 2x2x2
(video) cells. A router scores each region from its features; a region is coded
either by one coarse token (the mean of its cells) or by one fine token per cell.
Training samples the choice with hard Gumbel-softmax (straight-through) and a
budget loss pulls the fraction of fine regions to a target. The result has a
variable number of tokens per sample, packed as :class:`PackedCodes`.

Not a :class:`Quantizer`: its codes are not a fixed-shape tensor, so ``encode``
returns :class:`PackedCodes` and ``decode`` takes them; everything else (layout,
validation, exact ``decode(encode(z)) == forward(z).quantized`` in eval mode)
follows the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, as_weights, check_choice, check_number, evaluating, rows_of_items

Order = Literal["coarse_to_fine", "raster"]


@dataclass
class PackedCodes:
    """Variable-length codes of a batch, sample after sample.

    Attributes:
        codes: ``(N, *code_shape)`` int64 codes of all samples' tokens.
        positions: ``(N, n)`` int64 cell coordinate of each token (a coarse
            token's is its region's first cell, i.e. even on every axis).
        fine: ``(N,)`` bool, True for fine (one cell) tokens.
        offsets: ``(B + 1,)`` int64; sample ``b`` owns tokens ``offsets[b]:offsets[b+1]``.
        shape: the dense spatial shape ``S``.
    """

    codes: Tensor
    positions: Tensor
    fine: Tensor
    offsets: Tensor
    shape: tuple[int, ...]

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` number of tokens of each sample."""
        return self.offsets[1:] - self.offsets[:-1]

    def sample(self, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, positions, fine)`` of sample ``b``, in the packed order."""
        lo, hi = int(self.offsets[b]), int(self.offsets[b + 1])
        return self.codes[lo:hi], self.positions[lo:hi], self.fine[lo:hi]


@dataclass
class DynamicOutput(QuantizerOutput):
    """:class:`QuantizerOutput` whose ``codes`` is the dense ``(B, *S, *code_shape)``
    map (a coarse region's code repeated over its cells), plus the routing.

    Attributes:
        fine_map: ``(B, *S/2)`` bool, True where a region is coded by fine tokens.
        scores: ``(B, *S/2)`` router scores (logit of choosing fine).
    """

    fine_map: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))
    scores: Tensor = field(default_factory=lambda: torch.empty(0))


class DynamicQuantizer(nn.Module):
    """Coarse/fine routing over any quantizer; see the module docstring.

    Args:
        inner: the quantizer of every token, coarse and fine (VQ, FSQ, LFQ, residual...).
        target_fine_ratio: fraction of regions coded fine that the budget loss aims at.
        budget_weight: weight of the budget loss ``(mean p_fine - target)^2``.
        tau: Gumbel-softmax temperature.
        hidden: width of the router MLP (default ``2 D``).
        order: packed token order: ``"coarse_to_fine"`` (all coarse tokens in region
            raster order, then the fine tokens region by region) or ``"raster"``
            (region raster order, a fine region's cells consecutively).
        calibrate: route in eval by a calibrated score threshold (see below) instead
            of the sign of the score.
        threshold_decay: EMA decay of that threshold.

    Eval routing: a router trained with a budget loss matches the target *on
    average* (the mean probability of fine), but its scores need not be decisive,
    so routing by the sign of the score can give a very different ratio. With
    ``calibrate`` the module keeps an EMA of the ``1 - target`` quantile of the
    training batches' scores (the ``threshold`` buffer) and routes fine in eval where
    the score exceeds it; the fine ratio then matches the target on data like the
    training data, and the router still decides *which* regions are fine. After
    training, :meth:`calibrate_threshold` sets it exactly from a set of latents.

    The router sees each region's mean and standard deviation over its cells
    (``2D`` features), so one router works for any number of spatial axes. Spatial
    sizes must be even; a latent with an odd size raises (crop or pad it first).

    Example:
        >>> dq = DynamicQuantizer(VectorQuantizer(16, 256), target_fine_ratio=0.25)
        >>> packed = dq.encode(torch.randn(2, 8, 8, 16), fine_regions=4)
        >>> packed.lengths.tolist()   # 16 regions: 12 coarse + 4 x 4 fine tokens
        [28, 28]
        >>> dq.decode(packed).shape
        torch.Size([2, 8, 8, 16])
    """

    def __init__(
        self,
        inner: Quantizer,
        target_fine_ratio: float = 0.5,
        budget_weight: float = 1.0,
        tau: float = 1.0,
        hidden: int | None = None,
        order: Order = "coarse_to_fine",
        calibrate: bool = True,
        threshold_decay: float = 0.95,
    ):
        super().__init__()
        check_number("target_fine_ratio", target_fine_ratio, 0, 1, open_low=True, open_high=True)
        check_choice("order", order, ("coarse_to_fine", "raster"))
        check_number("tau", tau, 0, open_low=True)
        check_number("budget_weight", budget_weight, 0)
        check_number("threshold_decay", threshold_decay, 0, 1)
        check_number("hidden", hidden or 0, 0, integer=True)  # (0 or None: 2 D)
        if not inner.positionwise:
            raise ValueError(f"DynamicQuantizer feeds its inner quantizer a flat sequence of region tokens; "
                             f"{type(inner).__name__} quantizes positions with their neighbours: use a position-wise one")
        self.inner, self.dim = inner, inner.dim
        self.target_fine_ratio, self.budget_weight, self.tau, self.order = target_fine_ratio, budget_weight, tau, order
        self.calibrate, self.threshold_decay = calibrate, threshold_decay
        self.register_buffer("threshold", torch.zeros(()))
        h = hidden or 2 * inner.dim
        self.router = nn.Sequential(nn.Linear(2 * inner.dim, h), nn.GELU(), nn.Linear(h, 1))
        with torch.no_grad():  # start near the target ratio
            self.router[-1].bias.fill_(math.log(target_fine_ratio / (1 - target_fine_ratio)))

    @property
    def codebook_size(self) -> int:
        return self.inner.codebook_size

    @property
    def code_shape(self) -> tuple[int, ...]:
        return self.inner.code_shape

    @property
    def num_codebooks(self) -> int:
        return self.inner.num_codebooks

    # -- region geometry ---------------------------------------------------------------------
    def _check(self, z: Tensor) -> tuple[int, ...]:
        self.inner._check_latent(z)
        spatial = tuple(z.shape[1:-1])
        if not 1 <= len(spatial) <= 3:
            raise ValueError(f"DynamicQuantizer takes 1D, 2D or 3D latents (B, *S, D); got shape {tuple(z.shape)}")
        odd = [i for i, s in enumerate(spatial) if s % 2]
        if odd:
            raise ValueError(
                f"latent spatial shape {spatial} is not divisible by the coarse block 2 along axes {odd}; "
                "crop or pad the latent to even sizes"
            )
        return spatial

    @staticmethod
    def to_blocks(x: Tensor, n: int) -> Tensor:
        """``(B, *S, *rest) -> (B, *S/2, 2**n, *rest)``: each region's cells, in raster order."""
        b, spatial, rest = x.shape[0], x.shape[1 : 1 + n], x.shape[1 + n :]
        split = [b]
        for s in spatial:
            split += [s // 2, 2]
        x = x.reshape(*split, *rest)
        perm = [0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), *range(2 * n + 1, x.ndim)]
        return x.permute(perm).reshape(b, *(s // 2 for s in spatial), 2**n, *rest)

    @staticmethod
    def from_blocks(x: Tensor, n: int) -> Tensor:
        """Inverse of :meth:`to_blocks`."""
        b, regions, rest = x.shape[0], x.shape[1 : 1 + n], x.shape[2 + n :]
        x = x.reshape(b, *regions, *([2] * n), *rest)
        perm = [0]
        for i in range(n):
            perm += [1 + i, 1 + n + i]
        perm += list(range(1 + 2 * n, x.ndim))
        return x.permute(perm).reshape(b, *(2 * r for r in regions), *rest)

    def _expand(self, region_values: Tensor, n: int) -> Tensor:
        """``(B, *R, *rest) -> (B, *S, *rest)``: every cell takes its region's value."""
        rep = region_values.unsqueeze(n + 1).expand(*region_values.shape[: n + 1], 2**n, *region_values.shape[n + 1 :])
        return self.from_blocks(rep, n)

    def scores(self, z: Tensor) -> Tensor:
        """Router logits of choosing fine, ``(B, *S/2)``."""
        n = len(self._check(z))
        blocks = self.to_blocks(z, n).float()
        feats = torch.cat([blocks.mean(n + 1), blocks.std(n + 1, unbiased=False)], -1)
        return self.router(as_weights(self.router, feats)).squeeze(-1)

    @torch.no_grad()
    def calibrate_threshold(self, z: Tensor, batch_size: int = 256) -> float:
        """Set ``threshold`` to the ``1 - target`` quantile of the router scores of
        ``z`` ``(B, *S, D)`` (in batches), so that exactly the target fraction of
        their regions is fine in eval; returns the threshold."""
        check_number("batch_size", batch_size, 1, integer=True)
        s = torch.cat([self.scores(z[i : i + batch_size]).reshape(-1) for i in range(0, z.shape[0], batch_size)])
        self.threshold.fill_(torch.quantile(s.float(), 1 - self.target_fine_ratio))
        return float(self.threshold)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, z: Tensor, fine_regions: int | None = None) -> DynamicOutput:
        """Route and quantize ``z`` ``(B, *S, D)``.

        Training samples the routing (hard Gumbel-softmax); eval takes regions whose
        score is above the ``threshold`` buffer (with ``calibrate``; else above 0), or, with
        ``fine_regions``, exactly the top ``fine_regions`` regions of each sample by score.
        """
        spatial = self._check(z)
        n, b, d = len(spatial), z.shape[0], z.shape[-1]
        s = self.scores(z)
        n_regions = math.prod(s.shape[1:])
        if fine_regions is not None:
            fine = self._top_regions(s, fine_regions)
        elif self.training:
            logits = torch.stack([torch.zeros_like(s), s], -1)
            gate = F.gumbel_softmax(logits.float(), tau=self.tau, hard=True)[..., 1]
            fine = gate.detach() > 0.5
            if self.calibrate:
                with torch.no_grad():
                    q = torch.quantile(s.detach().float().reshape(-1), 1 - self.target_fine_ratio)
                    q = torch.where(torch.isfinite(q), q, self.threshold.float())  # a non-finite batch moves nothing
                    self.threshold.lerp_(q.to(self.threshold.dtype), 1 - self.threshold_decay)
        else:
            fine = s > (self.threshold if self.calibrate else 0.0)
        if self.training and fine_regions is not None:
            gate = fine.float()
        coarse = self.to_blocks(z, n).mean(n + 1)  # (B, *R, D)
        tokens = torch.cat([z.reshape(1, -1, d), coarse.reshape(1, -1, d)], 1)
        if self.training and any(getattr(m, "_row_items", 1) is None and m.dropout > 0 for m in self.inner.modules()):
            counts = (math.prod(spatial), math.prod(coarse.shape[1:-1]))  # a residual dropout's draw per item
            with rows_of_items(self.inner, torch.cat([torch.arange(b, device=z.device).repeat_interleave(c)
                                                      for c in counts]), b):
                out = self.inner(tokens)
        else:
            out = self.inner(tokens)
        n_fine_tok = b * math.prod(spatial)
        cs = self.inner.code_shape
        fine_codes = out.codes[0, :n_fine_tok].reshape(*z.shape[:-1], *cs)
        coarse_codes = out.codes[0, n_fine_tok:].reshape(*coarse.shape[:-1], *cs)
        cells = self._expand(fine, n)
        if self.training:
            fine_q = out.quantized[0, :n_fine_tok].reshape(z.shape).float()
            coarse_q = self._expand(out.quantized[0, n_fine_tok:].reshape(coarse.shape), n).float()
            g = self._expand(gate, n).unsqueeze(-1)
            quantized = (coarse_q + g * (fine_q - coarse_q)).to(z.dtype)
        else:
            quantized = self._assemble(fine_codes, coarse_codes, fine).to(z.dtype)
        codes = torch.where(cells.reshape(*cells.shape, *([1] * len(cs))), fine_codes, self._expand(coarse_codes, n))
        p_fine = torch.sigmoid(s.float())
        losses = dict(out.losses)
        losses["budget"] = self.budget_weight * (p_fine.mean() - self.target_fine_ratio) ** 2
        ratio = fine.float().mean()
        metrics = {f"{k}/inner": v for k, v in out.metrics.items()}
        metrics["fine_ratio"] = ratio.detach()
        metrics["tokens_per_sample"] = (n_regions * (1 + ratio * (2**n - 1))).detach()
        return DynamicOutput(quantized, codes, losses, metrics, fine_map=fine, scores=s.detach())

    def _top_regions(self, s: Tensor, k: int) -> Tensor:
        n_regions = math.prod(s.shape[1:])
        check_number("fine_regions", k, 0, integer=True)
        if k > n_regions:
            raise ValueError(f"fine_regions={k} is larger than the number of regions ({n_regions})")
        flat = s.detach().reshape(s.shape[0], -1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep.scatter_(1, flat.topk(k, dim=1).indices, True)
        return keep.reshape(s.shape)

    def _assemble(self, fine_codes: Tensor, coarse_codes: Tensor, fine: Tensor) -> Tensor:
        """Dense latent from both code maps and the routing: the single decoding path of
        ``forward`` (eval) and ``decode``, hence their bit-exact agreement."""
        n = fine.ndim - 1
        fine_q = self.inner._decode(fine_codes).float()
        coarse_q = self._expand(self.inner._decode(coarse_codes).float(), n)
        return torch.where(self._expand(fine, n).unsqueeze(-1), fine_q, coarse_q)

    # -- packed variable-length codes ---------------------------------------------------------
    def num_tokens(self, spatial: tuple[int, ...], fine_regions: int) -> int:
        """Tokens of one sample of spatial shape ``S`` with ``fine_regions`` fine regions."""
        n_regions = math.prod(s // 2 for s in spatial)
        return n_regions + fine_regions * (2 ** len(spatial) - 1)

    def fine_regions_for(self, spatial: tuple[int, ...], num_tokens: int) -> int:
        """Fine regions giving exactly ``num_tokens`` tokens per sample; raises when no
        routing gives that count."""
        check_number("num_tokens", num_tokens, 0, integer=True)
        n_regions, per = math.prod(s // 2 for s in spatial), 2 ** len(spatial) - 1
        k, rem = divmod(num_tokens - n_regions, per)
        if rem or not 0 <= k <= n_regions:
            lo, hi = n_regions, n_regions * 2 ** len(spatial)
            raise ValueError(
                f"num_tokens={num_tokens} is not reachable for latent {spatial}: counts are "
                f"{lo} + k*{per} for k in [0, {n_regions}] (range [{lo}, {hi}])"
            )
        return k

    @torch.no_grad()
    def encode(self, z: Tensor, fine_regions: int | None = None, num_tokens: int | None = None) -> PackedCodes:
        """Packed codes of ``z``; ``fine_regions`` or ``num_tokens`` fix the per-sample
        budget exactly (top regions by router score), otherwise the router decides."""
        spatial = self._check(z)
        if num_tokens is not None:
            if fine_regions is not None:
                raise ValueError("pass fine_regions or num_tokens, not both")
            fine_regions = self.fine_regions_for(spatial, num_tokens)
        with evaluating(self):  # each part's own mode after (a part frozen in eval stays so)
            out = self.forward(z, fine_regions)
        return self.pack(out.codes, out.fine_map)

    def pack(self, codes: Tensor, fine_map: Tensor) -> PackedCodes:
        """Dense code map ``(B, *S, *cs)`` + routing ``(B, *S/2)`` -> :class:`PackedCodes`."""
        n = fine_map.ndim - 1
        b, spatial, nb, cs = codes.shape[0], tuple(codes.shape[1 : 1 + n]), 2**n, tuple(codes.shape[1 + n :])
        blocks = self.to_blocks(codes, n).reshape(b, -1, nb, *cs)  # (B, R, 2^n, *cs)
        cell_pos = self.to_blocks(self._grid(spatial, codes.device).unsqueeze(0), n).reshape(-1, nb, n)
        fine = fine_map.reshape(b, -1)
        n_regions = fine.shape[1]
        region_id = torch.arange(n_regions, device=codes.device)
        out_codes, out_pos, out_fine, lengths = [], [], [], []
        for i in range(b):
            f = fine[i]
            c_ids, f_ids = region_id[~f], region_id[f]
            key_c = c_ids * nb
            key_f = (f_ids.unsqueeze(1) * nb + torch.arange(nb, device=codes.device)).reshape(-1)
            if self.order == "coarse_to_fine":
                key_f = key_f + n_regions * nb  # all fine tokens after all coarse tokens
            keys = torch.cat([key_c, key_f])
            order = keys.argsort(stable=True)
            out_codes.append(torch.cat([blocks[i, c_ids, 0], blocks[i, f_ids].reshape(-1, *cs)])[order])
            out_pos.append(torch.cat([cell_pos[c_ids, 0], cell_pos[f_ids].reshape(-1, n)])[order])
            out_fine.append(torch.cat([torch.zeros_like(c_ids, dtype=torch.bool), f_ids.new_ones(key_f.shape, dtype=torch.bool)])[order])
            lengths.append(keys.numel())
        offsets = torch.tensor([0, *lengths], device=codes.device).cumsum(0)
        return PackedCodes(torch.cat(out_codes), torch.cat(out_pos), torch.cat(out_fine), offsets, spatial)

    @staticmethod
    def _grid(spatial: tuple[int, ...], device) -> Tensor:
        axes = [torch.arange(s, device=device) for s in spatial]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (*S, n)

    def decode(self, packed: PackedCodes) -> Tensor:
        """Dense latents ``(B, *S, D)`` from :class:`PackedCodes`; exactly
        ``forward(z).quantized`` (eval mode) for ``packed = encode(z)``."""
        if not isinstance(packed, PackedCodes):
            raise ValueError(f"expected PackedCodes, got {type(packed).__name__}")
        spatial, n = tuple(packed.shape), len(packed.shape)
        if not 1 <= n <= 3 or any(s % 2 or s < 1 for s in spatial):
            raise ValueError(f"packed shape must be 1 to 3 positive even sizes, got {spatial}")
        bad = [k for k in ("codes", "positions", "fine", "offsets") if not isinstance(t := getattr(packed, k), Tensor)
               or t.is_floating_point() or t.is_complex()]
        if bad or tuple(packed.codes.shape[1:]) != tuple(self.inner.code_shape):
            raise ValueError(f"PackedCodes holds integer tensors: codes {('N', *self.inner.code_shape)}, positions (N, {n}), fine "
                             f"(N,), offsets (B + 1,); {'not integer tensors: ' + ', '.join(bad) if bad else f'codes are {tuple(packed.codes.shape)}'}")
        codes, pos, fine = packed.codes, packed.positions.long(), packed.fine.bool()
        if codes.numel() == 0:
            raise ValueError("empty packed codes")
        codes = self.inner._check_codes(codes)
        if pos.shape != (codes.shape[0], n) or fine.shape != (codes.shape[0],):
            raise ValueError(f"positions must be (N, {n}) and fine (N,) for {codes.shape[0]} tokens")
        if (off := packed.offsets).ndim != 1 or off.numel() < 2 or int(off[0]) != 0 or int(off[-1]) != codes.shape[0]:
            raise ValueError("offsets must be (B + 1,) for B >= 1 samples, start at 0 and end at the number of tokens")
        if ((lengths := packed.lengths) < 0).any():
            raise ValueError("offsets must be non-decreasing")
        size = torch.tensor(spatial, device=pos.device)
        if (pos < 0).any() or (pos >= size).any() or (pos[~fine] % 2 != 0).any():
            raise ValueError(f"positions out of the latent {spatial} (coarse tokens must sit on even cells)")
        b, cs, dev = lengths.numel(), tuple(codes.shape[1:]), codes.device
        sample = torch.repeat_interleave(torch.arange(b, device=dev), lengths)
        strides = torch.tensor([math.prod(spatial[i + 1 :]) for i in range(n)], device=dev)
        r_spatial = tuple(s // 2 for s in spatial)
        r_strides = torch.tensor([math.prod(r_spatial[i + 1 :]) for i in range(n)], device=dev)
        cell = sample * math.prod(spatial) + (pos * strides).sum(-1)
        region = sample * math.prod(r_spatial) + ((pos // 2) * r_strides).sum(-1)
        n_cells, n_regions = b * math.prod(spatial), b * math.prod(r_spatial)
        by_coarse = torch.zeros(n_regions, device=dev).index_add_(0, region[~fine], torch.ones_like(region[~fine], dtype=torch.float32))
        cover = torch.zeros(n_cells, device=dev).index_add_(0, cell[fine], torch.ones_like(cell[fine], dtype=torch.float32))
        cover = cover.reshape(b, *spatial) + self._expand(by_coarse.reshape(b, *r_spatial), n)
        if not torch.equal(cover, torch.ones_like(cover)):
            raise ValueError("packed tokens must cover every cell exactly once (a coarse token or all fine cells)")
        fine_codes, coarse_codes = codes.new_zeros(n_cells, *cs), codes.new_zeros(n_regions, *cs)
        fine_map = torch.zeros(n_regions, dtype=torch.bool, device=dev)
        fine_codes[cell[fine]] = codes[fine]
        coarse_codes[region[~fine]] = codes[~fine]
        fine_map[region[fine]] = True
        return self._assemble(fine_codes.reshape(b, *spatial, *cs), coarse_codes.reshape(b, *r_spatial, *cs),
                              fine_map.reshape(b, *r_spatial))
