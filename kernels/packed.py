"""Packed-key nearest-codeword search (Triton), the default top-1 l2 search where it applies.

The tiled kernel (:mod:`tokenizers_vq.kernels.tiled`) turns each dot product into a score
with one CUDA-core operation and keeps a running ``(min, tile)`` pair per tile element:
about 4 operations and 3 live fp32 values per distance. Here the tensor cores produce the
whole distance and the epilogue is 2 integer operations on one live int32:

- the distance is in the dot: ``x_aug = [x, 1, 1, 1, s1, s2, s3]`` (built per program in
  registers) against ``c_aug = [-2c, h1, h2, h3, 1, 1, 1]`` (one small kernel per call),
  the norms split into parts exact in the operand format, so ``acc = |x - c|^2``;
- the key ``min(run, (bits(acc) & ~(2^TILE_BITS - 1)) | t)`` orders like the distance and
  keeps the tile number ``t``; ``HALF`` tiles fold two half-tile keys with one 3-input
  min; the host caps a program's share of the codebook so the tag always fits;
- rows without six spare columns pad to twice the width, or carry the norms in a second
  16-wide dot (``EXT``) or as the dot's initial accumulator (``NORM_INIT``).

Accuracy: on top of the tiled kernel's rounding bound an index may differ from the exact
argmin where the two best distances differ by less than ``2^-(23 - TILE_BITS)`` of the
distance (``tests/nearest_checks.py``); returned distances are recomputed in fp32. Splits
write keys and indices per split; the merge keeps the earlier split on ties.

Scope: ``l2``, top-1, bf16 (``d <= 256``), or fp32 with ``precision="tf32"`` (``d <= 58``).
Everything else runs the tiled kernel. The host side (layout, scope, launch) is
:mod:`.packed_launch`; its tuning choices are a :class:`~tokenizers_vq.kernels.plan.SearchPlan`; the derivation, the tie and sign rules
and the measurements behind each choice are in ``eval/results/kernels/DESIGN.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tokenizers_vq.kernels.tiles import FIXED, merge_rows, prune_to_fit

EXTRA_COLUMNS = 6  # three 1-columns and three parts of a squared norm, on each side
INTERPRET_TILE = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
AUGMENT_BLOCK_K = 64  # divides SPLIT_QUANTUM


def _configs() -> list[triton.Config]:
    """Small-``d`` tiles, 64 elements per thread: two live 32-bit values each (accumulator
    and key) instead of the tiled kernel's three leave room for more warps per SM. ``c_aug`` rows are
    ``BLOCK_D`` wide (32 B bf16, 64 B fp32 at d = 8; the tiled kernel reads 16 / 32 B), so tall tiles
    (``BLOCK_N = 256``) halve the L2 reads per distance, which at 2 operations per
    distance may bind first (about 4 TB/s for bf16 at ``BLOCK_N = 128``). ``HALF`` tiles
    (two half-tile dots, one 3-input min: 1.5 integer operations per distance) won the H100
    sweep at d = 8, 16 and 27-32, by up to 37%; the autotuner picks per shape."""
    shapes = [(128, 128, 8, 3), (256, 64, 8, 3), (64, 256, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3),
              (64, 256, 4, 3, True), (64, 128, 4, 3, True), (128, 128, 8, 3, True), (128, 256, 8, 3, True),
              (64, 128, 4, 4, True),
              # wide rows (BLOCK_D 256, bf16 d 129-256): the x tile alone is 64 KiB at BLOCK_N 128, so
              # shallower pipelines and narrower codebook tiles; 128 x 64, 8 warps, 3 stages was the best
              # of five in the H100 sweep (eval/results/kernels/sweep_h100.md, "wide"); HALF lost there.
              # In the H200 tile grid (eval/results/kernels/tiles_h200.md) 64 x 64 with 4 warps and 2
              # stages was the best at 1024 and 16384 codes, and 128 x 32, 4 warps, 3 stages at 100000
              # codes (its 32 codes per tag cap a wide launch at 32768 codes per split: 4 splits there)
              (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3)]
    return [triton.Config({"BLOCK_N": s[0], "BLOCK_K": s[1], "HALF": len(s) > 4}, num_warps=s[2], num_stages=s[3])
            for s in shapes]


WIDE_CONFIGS = 10  # _configs()[10:] are the wide-row set (BLOCK_D > 128)
# Small problems (tiles.TUNE_MIN_WORK) launch one tile without the autotuner; for wide rows this one
# (H200 tile grid: 0.060 ms at 32768 x 1024 x 256 against 0.089 for the narrow rows' fixed 64 x 128)
WIDE_FIXED = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


def fixed_tile(block_d: int) -> dict:
    """The tile a small problem launches without the autotuner, for rows ``block_d`` wide."""
    return WIDE_FIXED if block_d > 128 else FIXED


def tile_set(wide: bool) -> list[dict]:
    """Every tile a launch may pick for wide (``BLOCK_D > 128``) or narrow rows: the autotuner's
    set, the fixed tile of small problems and the interpreter's."""
    configs = _configs()
    configs = configs[WIDE_CONFIGS:] if wide else configs[:WIDE_CONFIGS]
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs] + \
        [fixed_tile(256 if wide else 128), INTERPRET_TILE]


def tag_cols(tile: dict) -> int:
    """Codes per key tag of a tile: ``BLOCK_K``, or half of it with ``HALF`` (two tags per tile)."""
    return tile["BLOCK_K"] // (2 if tile.get("HALF") else 1)


MIN_TAG_COLS = {wide: min(tag_cols(t) for t in tile_set(wide)) for wide in (False, True)}
"""Fewest codes per key tag of any tile a launch may pick, for narrow (False) and wide (True) rows."""


@triton.jit
def _operand_round(v, DT: tl.constexpr):
    """``v`` (fp32) rounded to what the tensor cores read for operand dtype ``DT``, in fp32:
    tf32 keeps the top 10 mantissa bits of an fp32 (masked, so exact whatever the
    hardware's own rounding), bf16 rounds to nearest."""
    if DT == tl.float32:
        return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return v.to(DT).to(tl.float32)


@triton.jit
def _parts(v, DT: tl.constexpr):
    """``v = p1 + p2 + p3`` exactly, each part exact in the operand format: three parts
    hold the fp32 significand's 24 bits (bf16: 3 x 8 bits; tf32: 3 x 11)."""
    p1 = _operand_round(v, DT)
    p2 = _operand_round(v - p1, DT)
    p3 = _operand_round((v - p1) - p2, DT)
    return p1, p2, p3


@triton.jit
def _aug_tile(main, col, D, NC, s1, s2, s3, X_SIDE: tl.constexpr):
    """Columns ``col`` (absolute, ``(1, W)``) of augmented rows: ``main`` below ``d``
    (x, or ``-2 c``: fp32 ``(R, W)``, or a scalar when every column is past ``d``); in
    the six columns from ``NC``, three 1s and the norm parts ``s1, s2, s3`` ``(R,)``
    (x side: 1s first; codebook side: parts first); zeros elsewhere."""
    nb = NC + 3 if X_SIDE else NC
    norm = tl.where(col == nb, s1[:, None], tl.where(col == nb + 1, s2[:, None], s3[:, None]))
    aug = tl.where((col >= nb) & (col < nb + 3), norm, 1.0)
    return tl.where(col < D, main, tl.where((col >= NC) & (col < NC + 6), aug, 0.0))


@triton.jit
def _augment_kernel(C, CA, CSQ, K, D, NC, scg, sck, scd, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    EXT: tl.constexpr, NORM_INIT: tl.constexpr):
    """``c_aug`` (module docstring), ``(G, K_pad, BLOCK_D + EXT)`` contiguous, every
    element written; rows ``>= K`` and codes holding Inf or NaN (or whose ``|c|^2``
    overflows) are zeros with ``h1 = +inf`` (distance ``+inf``: never chosen, as in the
    tiled kernel, where such a code's distance is NaN or ``+inf``).
    ``NORM_INIT``: ``c_aug = [-2c, 0...]`` and fp32 ``|c|^2`` in ``CSQ (G, K_pad)``
    (``+inf`` for those rows) instead of the norm columns."""
    g = tl.program_id(1).to(tl.int64)
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)[None, :]
    c = tl.load(C + g * scg + kk[:, None].to(tl.int64) * sck + dd * scd, mask=(kk < K)[:, None] & (dd < D), other=0.0)
    c = c.to(tl.float32)
    csq = tl.sum(c * c, axis=1)
    real = (kk < K) & (csq < float("inf"))  # False for NaN too
    c = tl.where(real[:, None], c, 0.0)
    csq = tl.where(real, csq, 0.0)
    h1, h2, h3 = _parts(csq, CA.dtype.element_ty)
    h1 = tl.where(real, h1, float("inf"))
    k_pad = tl.num_programs(0) * BLOCK_K
    if NORM_INIT:
        tl.store(CSQ + g * k_pad + kk, tl.where(real, csq, float("inf")))
    row = CA + (g * k_pad + kk[:, None]) * (BLOCK_D + EXT)
    tl.store(row + dd, _aug_tile(-2.0 * c, dd, D, NC, h1, h2, h3, False).to(CA.dtype.element_ty))
    if EXT > 0:
        ee = tl.arange(0, EXT)[None, :]
        tl.store(row + BLOCK_D + ee, _aug_tile(0.0, BLOCK_D + ee, D, NC, h1, h2, h3, False).to(CA.dtype.element_ty))


@triton.jit
def _exact_l2(xf, C_g, i, rmask, dd, D, sck, scd):
    """``|x - c_i|^2`` in fp32 for fp32 rows ``xf`` (zeros past ``d``) and indices ``i``."""
    c = tl.load(C_g + i[:, None].to(tl.int64) * sck + dd[None, :] * scd,
                mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    diff = xf - c.to(tl.float32)
    return tl.sum(diff * diff, axis=1)


@triton.jit
def _key(acc, tag, TILE_BITS: tl.constexpr, ASM: tl.constexpr):
    """``(bits(acc) & ~(2^TILE_BITS - 1)) | tag``: with ``ASM`` one ``lop3`` (ptxas left the
    AND and the OR as two LOP3s wherever a second dot or a wider row held more registers
    live: 3 integer operations per distance instead of 2, in the sm_90 SASS of d = 16-128)."""
    bits = acc.to(tl.int32, bitcast=True)
    if ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $2, $3, $1, 0xF8;", "=r,r,r,r",
                                         [bits, tag, -(1 << TILE_BITS)], dtype=tl.int32, is_pure=True, pack=1)
    return (bits & -(1 << TILE_BITS)) | tag


@triton.jit
def _min3(a, b, c, ASM: tl.constexpr):
    """``min(a, b, c)`` (int32); with ``ASM`` written so that ptxas emits one VIMNMX3 (its
    own pattern matching fused only some of them)."""
    if ASM:
        return tl.inline_asm_elementwise("{ .reg .s32 m; min.s32 m, $2, $3; min.s32 $0, $1, m; }", "=r,r,r,r",
                                         [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    return tl.minimum(a, tl.minimum(b, c))


@triton.jit
def _dist_tile(xa, xe, c_ptr, e_ptr, xsq, csq_ptr, EXT: tl.constexpr, NORM_INIT: tl.constexpr,
               DOT_F32: tl.constexpr):
    """``|x - c|^2`` for one codebook tile: ``c_ptr`` ``(BLOCK_D, cols)`` and ``e_ptr``
    ``(EXT, cols)`` pointers into ``c_aug`` (``csq_ptr``: the ``|c|^2`` of the columns,
    with ``NORM_INIT``)."""
    c = tl.load(c_ptr)
    if NORM_INIT:
        acc = xsq[:, None] + tl.load(csq_ptr)[None, :]
        if DOT_F32:
            acc = tl.dot(xa.to(tl.float32), c.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xa, c, acc, input_precision="tf32")
    elif DOT_F32:
        acc = tl.dot(xa.to(tl.float32), c.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(xa, c, input_precision="tf32")
    if EXT > 0:
        c2 = tl.load(e_ptr)
        if DOT_F32:
            acc = tl.dot(xe.to(tl.float32), c2.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xe, c2, acc, input_precision="tf32")
    return acc


def _prune(configs, named_args, **meta):
    """The set for this row width (``BLOCK_D <= 128`` or wide), pruned to the configs whose
    tiles of ``BLOCK_D + EXT`` columns fit in shared memory."""
    wide = meta["BLOCK_D"] > 128
    return prune_to_fit(configs[WIDE_CONFIGS:] if wide else configs[:WIDE_CONFIGS], named_args,
                        BLOCK_D=meta["BLOCK_D"] + meta["EXT"], limit=(224 if wide else 200) * 1024)


@triton.autotune(configs=_configs(), key=["BLOCK_D", "EXT", "TILE_BITS", "NORM_INIT", "K_SPLIT", "ASM"],  # and the dtypes
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit
def _packed_kernel(X, C, CA, OUT_D, OUT_I, N, K, K_PAD, D, K_SPLIT,
                   sxg, sxn, sxd, scg, sck, scd, sog, sos,
                   SPLIT: tl.constexpr, WRITE_DIST: tl.constexpr, TILE_BITS: tl.constexpr,
                   BLOCK_D: tl.constexpr, EXT: tl.constexpr, DOT_F32: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_INIT: tl.constexpr = False, CSQ=None,
                   HALF: tl.constexpr = False, ASM: tl.constexpr = False):
    """Grid ``(row blocks, splits, G)``. Writes ``(dist, idx)`` ``(G, N)``, or with
    ``SPLIT`` the partial int32 ``(key without tile bits, index)`` ``(G, S, N)``.
    ``EXT``: 0 when the six norm columns fit past ``d`` in the padded row, else 16, the
    width of a second dot that holds them (the narrowest dot Triton emits on the GPU).
    ``NORM_INIT`` (with ``EXT = 0``; for rows without spare columns): no norm columns;
    the dot accumulates ``-2 x.c`` onto ``|x|^2 + |c|^2`` (fp32, ``CSQ``), one add per
    distance instead of the second dot.
    ``DOT_F32`` (interpreter only, whose bf16 dot is wrong) upcasts the operands."""
    pid_n, pid_s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    dd = tl.arange(0, BLOCK_D)
    HK: tl.constexpr = BLOCK_K // 2 if HALF else BLOCK_K  # columns of one dot (a half tile with HALF)
    cols = tl.arange(0, HK)
    x = tl.load(X + g * sxg + rows[:, None].to(tl.int64) * sxn + dd[None, :] * sxd,
                mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    xf = x.to(tl.float32)
    s1, s2, s3 = _parts(tl.sum(xf * xf, axis=1), x.dtype)
    NC = BLOCK_D if EXT > 0 or NORM_INIT else D  # first of the six norm columns (none in the tile: BLOCK_D)
    xa = _aug_tile(xf, dd[None, :], D, NC, s1, s2, s3, True).to(x.dtype)
    xsq = tl.sum(xf * xf, axis=1)  # used only with NORM_INIT
    csq_ptr = CSQ + g * K_PAD + pid_s * K_SPLIT + cols if NORM_INIT else CA
    W = BLOCK_D + EXT  # c_aug row length

    k_lo = pid_s * K_SPLIT
    ca = CA + (g * K_PAD + k_lo + cols[None, :]) * W + dd[:, None]  # (BLOCK_D, HK) tile
    if EXT > 0:
        ee = tl.arange(0, EXT)
        xe = _aug_tile(0.0, BLOCK_D + ee[None, :], D, NC, s1, s2, s3, True).to(x.dtype)
        ce = CA + (g * K_PAD + k_lo + cols[None, :]) * W + BLOCK_D + ee[:, None]  # (EXT, HK) tile
    else:
        xe, ce = xa, ca  # unused
    run = tl.full([BLOCK_N, HK], 2**31 - 1, tl.int32)
    for t in range(0, tl.cdiv(tl.minimum(k_lo + K_SPLIT, K_PAD) - k_lo, BLOCK_K)):  # no masks: padded rows
        acc = _dist_tile(xa, xe, ca, ce, xsq, csq_ptr, EXT, NORM_INIT, DOT_F32)
        if HALF:
            acc2 = _dist_tile(xa, xe, ca + HK * W, ce + HK * W, xsq, csq_ptr + HK, EXT, NORM_INIT, DOT_F32)
            run = _min3(run, _key(acc, 2 * t, TILE_BITS, ASM), _key(acc2, 2 * t + 1, TILE_BITS, ASM), ASM)
        else:
            run = tl.minimum(run, _key(acc, t, TILE_BITS, ASM))
        ca += BLOCK_K * W
        ce += BLOCK_K * W
        csq_ptr += BLOCK_K

    # Least key (tag bits included), then its lowest column; padding or NaN rows fall back to k_lo.
    m = tl.min(run, axis=1)
    col = tl.min(tl.where(run == m[:, None], cols[None, :], HK), axis=1)
    i = k_lo + (m & ((1 << TILE_BITS) - 1)) * HK + col  # tag 2t + half (HALF) or t: tag * HK is the tile's offset
    i = tl.where(i < tl.minimum(k_lo + K_SPLIT, K), i, k_lo)
    if SPLIT:
        o = g * sog + pid_s * sos + rows
        tl.store(OUT_D + o, m & -(1 << TILE_BITS), mask=rmask)
        tl.store(OUT_I + o, i, mask=rmask)
    else:
        if WRITE_DIST:  # x itself, from registers
            tl.store(OUT_D + g * sog + rows, _exact_l2(xf, C + g * scg, i, rmask, dd, D, sck, scd), mask=rmask)
        tl.store(OUT_I + g * sog + rows, i.to(tl.int64), mask=rmask)


@triton.jit
def _packed_merge_kernel(X, C, PK, PI, DIST, IDX, N, S, D, sxg, sxn, sxd, scg, sck, scd,
                         WRITE_DIST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Least partial key over the ``S`` splits (earlier split on ties), then the exact distance."""
    g = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    _, i = merge_rows(PK, PI, g * S * N + rows, rmask, N, S)
    if WRITE_DIST:
        dd = tl.arange(0, BLOCK_D)
        xf = tl.load(X + g * sxg + rows[:, None].to(tl.int64) * sxn + dd[None, :] * sxd,
                     mask=rmask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        tl.store(DIST + g * N + rows, _exact_l2(xf, C + g * scg, i, rmask, dd, D, sck, scd), mask=rmask)
    tl.store(IDX + g * N + rows, i.to(tl.int64), mask=rmask)
