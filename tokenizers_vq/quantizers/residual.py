"""Residual quantization over any quantizer (Zeghidour et al. 2021, SoundStream;
Lee et al. 2022, RQ-VAE): level ``i`` quantizes what levels ``< i`` left over."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_same_codes, merge_outputs


class ResidualQuantizer(Quantizer):
    """``L`` quantizers applied to successive residuals; codes gain a level axis.

    Codes are ``(B, *S, L, *inner_code_shape)``; the quantized latent is the sum of
    the levels' outputs. Each level keeps its own gradient estimator.

    Args:
        levels: the ``L`` quantizers (same ``dim``, ``codebook_size`` and code shape),
            e.g. ``[VectorQuantizer(64, 1024) for _ in range(8)]`` or FSQs.
        dropout: probability that a training item keeps only its first ``n`` levels,
            ``n`` uniform in ``[1, L]`` (quantizer dropout, SoundStream), so that the
            model decodes well from any prefix of levels.

    Example:
        >>> rvq = ResidualQuantizer([VectorQuantizer(32, 256) for _ in range(4)])
        >>> rvq(torch.randn(2, 50, 32)).codes.shape
        torch.Size([2, 50, 4])
    """

    def __init__(self, levels: Sequence[Quantizer], dropout: float = 0.0):
        check_same_codes(levels, "ResidualQuantizer")
        super().__init__(levels[0].dim, check_finite=levels[0].check_finite)
        if any(q.dim != self.dim for q in levels):
            raise ValueError("ResidualQuantizer: all levels must have the same dim")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.levels = nn.ModuleList(levels)
        self.dropout = dropout

    @property
    def codebook_size(self) -> int:
        return self.levels[0].codebook_size

    @property
    def positionwise(self) -> bool:  # type: ignore[override]
        return all(q.positionwise for q in self.levels)

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (len(self.levels), *self.levels[0].code_shape)

    def _forward(self, z: Tensor) -> QuantizerOutput:
        keep = None
        if self.training and self.dropout > 0:
            n_lv = len(self.levels)
            drop = torch.rand(z.shape[0], device=z.device) < self.dropout
            n_keep = torch.where(drop, torch.randint(1, n_lv + 1, (z.shape[0],), device=z.device), n_lv)
            keep = n_keep.view(-1, *([1] * (z.ndim - 1)))
        residual, total, outs = z, torch.zeros_like(z, dtype=torch.float32), []
        for i, level in enumerate(self.levels):
            out = level(residual)
            q = out.quantized if keep is None else out.quantized * (keep > i)
            total = total + q.float()
            residual = residual - q.detach()
            outs.append(out)
        losses, metrics = merge_outputs(outs, "level")
        codes = torch.stack([o.codes for o in outs], dim=z.ndim - 1)
        return QuantizerOutput(total.to(z.dtype), codes, losses, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        axis = codes.ndim - len(self.code_shape)
        return sum(lv._decode(c).float() for lv, c in zip(self.levels, codes.unbind(axis)))
