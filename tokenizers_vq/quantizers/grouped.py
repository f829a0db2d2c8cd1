"""Grouped quantization: the channels are split into ``G`` groups, each quantized
by its own quantizer (multi-head VQ; Baevski et al. 2020, wav2vec 2.0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_same_codes, merge_outputs


class GroupedQuantizer(Quantizer):
    """``G`` quantizers over consecutive channel groups; codes gain a group axis.

    ``D`` is the sum of the groups' dims; codes are ``(B, *S, G, *inner_code_shape)``.

    Args:
        groups: the ``G`` quantizers (same ``codebook_size`` and code shape).

    Example:
        >>> gq = GroupedQuantizer([FSQ(4, [8, 8, 8, 8]) for _ in range(3)])
        >>> gq(torch.randn(2, 10, 12)).codes.shape
        torch.Size([2, 10, 3])
    """

    def __init__(self, groups: Sequence[Quantizer]):
        check_same_codes(groups, "GroupedQuantizer")
        super().__init__(sum(q.dim for q in groups), check_finite=groups[0].check_finite)
        self.groups = nn.ModuleList(groups)
        self.splits = [q.dim for q in groups]

    @property
    def codebook_size(self) -> int:
        return self.groups[0].codebook_size

    @property
    def positionwise(self) -> bool:  # type: ignore[override]
        return all(q.positionwise for q in self.groups)

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (len(self.groups), *self.groups[0].code_shape)

    def num_tokens(self, grid: Sequence[int]) -> int:
        """The tokens of each group's quantizer, summed."""
        return sum(g.num_tokens(grid) for g in self.groups)

    def _forward(self, z: Tensor) -> QuantizerOutput:
        outs = [g(part) for g, part in zip(self.groups, z.split(self.splits, dim=-1))]
        losses, metrics = merge_outputs(outs, "group")
        quantized = torch.cat([o.quantized for o in outs], dim=-1)
        codes = torch.stack([o.codes for o in outs], dim=z.ndim - 1)
        return QuantizerOutput(quantized, codes, losses, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        axis = codes.ndim - len(self.code_shape)
        parts = [g._decode(c) for g, c in zip(self.groups, codes.unbind(axis))]
        dtype = torch.promote_types(parts[0].dtype, parts[-1].dtype)
        return torch.cat([p.to(dtype) for p in parts], dim=-1)
