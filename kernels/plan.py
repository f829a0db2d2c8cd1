"""The tuning choices of the search kernels, as one frozen value.

Every host function of the search reads its choices from a :class:`SearchPlan` passed to
it (default :data:`DEFAULT_PLAN`: the values the H100 sweep chose, ``eval/results/kernels/sweep_h100.md``,
and the H200 tile grid, ``tiles_h200.md``, where it disagreed). Tests and the sweep pass a modified copy
(``DEFAULT_PLAN.replace(tile_bits=2)``) instead of changing module state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch


def _per_dtype(**values: int) -> Mapping[torch.dtype, int]:
    return MappingProxyType({getattr(torch, k): v for k, v in values.items()})


@dataclass(frozen=True)
class SearchPlan:
    """Choices of the packed and tiled search kernels.

    Attributes:
        tile_bits: tile-number bits of the packed kernel's key (the rest of the 23
            mantissa bits are kept; tests lower it to exercise the split cap).
        use_asm: the packed kernel's inline-PTX epilogue on the GPU.
        force_tile: every packed launch takes this tile (``BLOCK_N``, ``BLOCK_K``,
            ``num_warps``, ``num_stages``) without the autotuner (the sweep, tests).
        norm_init_min_block_d: rows without 6 spare columns and ``BLOCK_D`` at least
            this carry the norms as the dot's initial accumulator, not a second dot
            (H100 sweep "norminit": 9-12% faster at d = 128 and 256, 4-6% slower at 32) ...
        norm_init_max_aug_bytes: ... while the augmented codebook stays this small. At
            32768 x 100000 x 256 (51 MiB) the H100 sweep had the second dot faster with the
            wide tiles it tried (128 codes per tag: 2 splits); the H200 tile grid, whose 128 x
            32 tiles cap a wide launch at 4 splits, had the initial accumulator faster: 3.72
            against 4.13 ms. So the cap is ``max_aug_bytes``: an H100 run should check it.
        ext_max_d: per dtype, the widest ``d`` run with a second (norm) dot.
        max_row_bytes: per dtype, the padded query row kept in registers for the walk.
        pad_up_max_d: per dtype, rows without spare columns up to this ``d`` pad to twice
            the width (one dot; H100 sweeps "padup", "padup_half").
        max_aug_bytes: the augmented codebook copy's cap; a larger one runs the tiled
            kernel (the search's extra-memory bound).
        row_reduce_min_d: ``d`` from which the tiled kernel reduces each tile to its rows
            at once.
    """

    tile_bits: int = 10
    use_asm: bool = True
    force_tile: Mapping[str, int] | None = None
    norm_init_min_block_d: int = 128
    norm_init_max_aug_bytes: int = 64 << 20
    ext_max_d: Mapping[torch.dtype, int] = field(default_factory=lambda: _per_dtype(bfloat16=256, float32=32))
    max_row_bytes: Mapping[torch.dtype, int] = field(default_factory=lambda: _per_dtype(bfloat16=512, float32=256))
    pad_up_max_d: Mapping[torch.dtype, int] = field(default_factory=lambda: _per_dtype(bfloat16=32))
    max_aug_bytes: int = 64 << 20
    row_reduce_min_d: int = 512

    def __post_init__(self) -> None:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        key = tuple(tuple(sorted(v.items(), key=str)) if isinstance(v, Mapping) else v for v in values)
        object.__setattr__(self, "_hash", hash(key))  # hashed once: the launch caches key on the plan

    def __hash__(self) -> int:
        return self._hash

    def replace(self, **changes) -> SearchPlan:
        """A copy with ``changes`` (field names as above)."""
        return dataclasses.replace(self, **changes)


DEFAULT_PLAN = SearchPlan()
"""The choices every call uses unless given another plan."""
