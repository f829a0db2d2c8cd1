"""Host side of the packed search (:mod:`.packed` holds its Triton kernels): the row layout
for a dtype and width, whether the packed kernel applies, the split cap its key tags allow,
the launch setup computed once per shape, and :func:`nearest_packed`, the launch."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from tokenizers_vq.kernels import relaunch
from tokenizers_vq.kernels.packed import (
    AUGMENT_BLOCK_K,
    EXTRA_COLUMNS,
    INTERPRET_TILE,
    MIN_TAG_COLS,
    _augment_kernel,
    _packed_kernel,
    _packed_merge_kernel,
    fixed_tile,
    tag_cols,
)
from tokenizers_vq.kernels.plan import DEFAULT_PLAN, SearchPlan
from tokenizers_vq.kernels.tiles import (
    SPLIT_QUANTUM,
    _interpret,
    _split_plan,
    aligned,
    cdiv,
    new_outputs,
    next_pow2,
    tile_choice,
)


@functools.lru_cache(maxsize=256)
def _layout(dtype: torch.dtype, d: int, pad_up_max_d: int, ext_max_d: int, max_row_bytes: int) -> tuple[int, int] | None:
    block_d = max(16, next_pow2(d))
    if block_d * torch.finfo(dtype).bits // 8 > max_row_bytes:
        return None
    if d + EXTRA_COLUMNS <= block_d:
        return block_d, 0
    if d <= pad_up_max_d and 2 * block_d * torch.finfo(dtype).bits // 8 <= max_row_bytes:
        return 2 * block_d, 0  # one dot twice as wide instead of a second dot
    if d > ext_max_d:
        return None
    return block_d, 16  # the narrowest dot Triton emits on GPU (K >= 16, tf32 too)


def layout(dtype: torch.dtype, d: int, plan: SearchPlan = DEFAULT_PLAN) -> tuple[int, int] | None:
    """``(BLOCK_D, EXT)`` of the packed kernel for rows of ``d`` values of ``dtype``:
    ``EXT = 0`` when the six norm columns fit in the padded row past ``d`` (or, up to
    ``plan.pad_up_max_d``, in a row padded to twice the width), else the width of the second
    dot that holds them; ``None`` when the padded row is wider than ``plan.max_row_bytes``
    or the second dot is not worth it (``d > plan.ext_max_d``): the tiled kernel then runs."""
    return _layout(dtype, d, plan.pad_up_max_d.get(dtype, 0), plan.ext_max_d.get(dtype, 0),
                   plan.max_row_bytes.get(dtype, 0))


def aug_bytes(dtype: torch.dtype, groups: int, k: int, d: int, plan: SearchPlan = DEFAULT_PLAN) -> int:
    """Bytes of ``c_aug`` for ``groups`` codebooks of ``k`` codes (``layout`` not None)."""
    block_d, ext = layout(dtype, d, plan)
    return groups * cdiv(k, SPLIT_QUANTUM) * SPLIT_QUANTUM * (block_d + ext) * torch.finfo(dtype).bits // 8


def applies(dtype: torch.dtype, d: int, metric: str, precision: str, groups: int = 1, k: int = 1,
            plan: SearchPlan = DEFAULT_PLAN) -> bool:
    """Whether the packed kernel runs (else the tiled kernel) for these inputs (``dtype``: the common
    dtype of x and the codebook; ``groups`` codebooks of ``k`` codes)."""
    if metric != "l2" or not (dtype == torch.bfloat16 or (dtype == torch.float32 and precision == "tf32")):
        return False
    lay = layout(dtype, d, plan)
    if lay is None or _cap(plan.tile_bits, MIN_TAG_COLS[lay[0] > 128]) < SPLIT_QUANTUM:  # no room for one split
        return False
    return aug_bytes(dtype, groups, k, d, plan) <= plan.max_aug_bytes


def _cap(tile_bits: int, cols: int) -> int:
    """``2^tile_bits`` tags of ``cols`` codes rounded down to a multiple of ``SPLIT_QUANTUM``;
    0 for tile bits outside the key's 1-22."""
    return 2**tile_bits * cols // SPLIT_QUANTUM * SPLIT_QUANTUM if 0 < tile_bits < 23 else 0


def max_split(tile_bits: int, cols: int) -> int:
    """Most codes one program may walk: ``2^tile_bits`` tags of ``cols`` codes (the tile's
    :func:`tag_cols`, or the fewest of any tile the launch may pick, ``MIN_TAG_COLS``), rounded
    down to a multiple of ``SPLIT_QUANTUM``."""
    cap = _cap(tile_bits, cols)
    if cap < SPLIT_QUANTUM:
        raise ValueError(f"tile_bits={tile_bits} leaves no room for one split of {SPLIT_QUANTUM} codes")
    return cap


class _Setup(NamedTuple):
    """What one shape of call launches, computed once per shape (see :func:`_setup`)."""

    k_pad: int
    c_aug_shape: tuple[int, int, int]
    norm_init: bool
    s: int
    aug_grid: tuple[int, int]
    augment: relaunch.Launcher
    nc: int
    sizes: tuple[int, ...]  # the packed kernel's size arguments past the strides' place
    grid: Callable
    meta: dict
    search: relaunch.Launcher  # the packed kernel with meta and its tile (fixed, forced, or the autotuner's)
    merge_grid: tuple[int, int]
    merge: relaunch.Launcher


@functools.lru_cache(maxsize=1024)
def _setup(dtype: torch.dtype, g: int, n: int, k: int, d: int, device: torch.device, write_dist: bool,
           split_k: int | None, tile_items: tuple | None, plan: SearchPlan, interpret: bool) -> _Setup:
    """The launch choices of :func:`nearest_packed` for one shape: split, layout, metadata
    and grids depend on the shapes, dtype, device and plan only, so a repeated call (every
    training step, every batch of an encode) reuses them instead of recomputing them in Python."""
    tile = dict(tile_items) if tile_items is not None else None
    tile_bits = plan.tile_bits
    block_d, ext = layout(dtype, d, plan)
    k_pad = cdiv(k, SPLIT_QUANTUM) * SPLIT_QUANTUM
    # One wave of row blocks is enough here: at 256 blocks on the H100's 132 SMs, a second split (another
    # launch, the merge) saved no GPU time and cost 0.06 ms of host time (H100 sweep "splitone").
    cap = max_split(tile_bits, tag_cols(tile) if tile is not None else MIN_TAG_COLS[block_d > 128])
    s, k_split = _split_plan(g, n, k, device, split_k, cap, unsplit_waves=1)
    esize = torch.finfo(dtype).bits // 8
    norm_init = ext > 0 and block_d >= plan.norm_init_min_block_d and g * k_pad * block_d * esize <= plan.norm_init_max_aug_bytes
    ext = 0 if norm_init else ext
    meta = dict(SPLIT=s > 1, WRITE_DIST=write_dist, TILE_BITS=tile_bits, BLOCK_D=block_d, EXT=ext,
                DOT_F32=interpret and dtype == torch.bfloat16, NORM_INIT=norm_init, ASM=plan.use_asm and not interpret)

    def grid(m):
        return (cdiv(n, m["BLOCK_N"]), s, g)

    chosen, tile = ((_packed_kernel.fn, tile) if tile is not None
                    else tile_choice(_packed_kernel, g * n * k, interpret, INTERPRET_TILE, fixed_tile(block_d)))
    search = relaunch.Launcher(chosen, **meta, **tile)
    return _Setup(k_pad=k_pad, c_aug_shape=(g, k_pad, block_d + ext), norm_init=norm_init, s=s,
                  aug_grid=(k_pad // AUGMENT_BLOCK_K, g),
                  augment=relaunch.Launcher(_augment_kernel, BLOCK_K=AUGMENT_BLOCK_K, BLOCK_D=block_d, EXT=ext,
                                            NORM_INIT=norm_init),
                  nc=block_d if ext > 0 or norm_init else d, sizes=(n, k, k_pad, d, k_split), grid=grid, meta=meta,
                  search=search, merge_grid=(cdiv(n, 128), g),
                  merge=relaunch.Launcher(_packed_merge_kernel, WRITE_DIST=write_dist, BLOCK=128, BLOCK_D=block_d))


def nearest_packed(x: Tensor, codebook: Tensor, write_dist: bool, split_k: int | None,
                   tile: dict | None = None, plan: SearchPlan = DEFAULT_PLAN) -> tuple[Tensor, Tensor]:
    """Launch on grouped ``x (G, N, d)`` / ``codebook (G, K, d)``, or on one codebook ``x (N, d)`` /
    ``codebook (K, d)``, both bf16 or both fp32 (tf32 dot products), any strides, with
    :func:`applies` true; returns ``(G, N)`` (or ``(N,)``) fp32 distances (empty unless
    ``write_dist``) and int64 indices. ``tile`` (the tuning sweep; else ``plan.force_tile``):
    ``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages`` launched without the autotuner."""
    if x.ndim == 2:  # one codebook: the kernels see a group stride of 0, no group axis is added or removed
        (n, d), g, k = x.shape, 1, codebook.shape[0]
        xs, cs = (0, *x.stride()), (0, *codebook.stride())
    else:
        (g, n, d), k = x.shape, codebook.shape[1]
        xs, cs = x.stride(), codebook.stride()
    device = x.device
    dist, idx = new_outputs(x, write_dist)
    if n == 0:
        return dist, idx
    tile = tile or plan.force_tile or None
    st = _setup(x.dtype, g, n, k, d, device, write_dist, split_k,
                None if tile is None else tuple(sorted(tile.items())), plan, _interpret())
    c_aug = torch.empty(st.c_aug_shape, device=device, dtype=x.dtype)
    csq = torch.empty(g, st.k_pad, device=device, dtype=torch.float32) if st.norm_init else None
    st.augment(st.aug_grid, codebook, c_aug, csq, k, d, st.nc, *cs)
    s = st.s
    if s == 1:
        out_k, out_i, row_stride, part_n = dist, idx, n, 0
    else:
        seg = aligned(g * s * n)
        both = torch.empty(2 * seg, device=device, dtype=torch.int32)  # one allocation
        out_k, out_i = both[:g * s * n].view(g, s, n), both[seg:seg + g * s * n].view(g, s, n)
        row_stride, part_n = s * n, n
    st.search(st.grid, x, codebook, c_aug, out_k, out_i, *st.sizes, *xs, *cs, row_stride, part_n, CSQ=csq)
    if s > 1:
        st.merge(st.merge_grid, x, codebook, out_k, out_i, dist, idx, n, s, d, *xs, *cs)
    return dist, idx
