"""Shared pieces of the search kernels: the score of a tile of distances (bias, scale,
dot), row loading and finishing, split planning and the merge of split partials, launch
with or without the autotuner, and output allocation. Used by :mod:`.tiled`,
:mod:`.packed` and :mod:`.topk`; it imports none of them."""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenizers_vq.kernels import relaunch
from tokenizers_vq.kernels._host import cdiv, next_pow2

SPLIT_QUANTUM = 256  # each split covers a multiple of every BLOCK_K, so tiles never straddle splits
MAX_ONE_CHUNK_BYTES = 256  # x row bytes (padded) kept for the whole codebook walk; larger d goes in 64-wide chunks
COS_EPS = tl.constexpr(1e-12)  # as F.normalize


def _interpret() -> bool:
    return triton.knobs.runtime.interpret



TUNE_MIN_WORK = 2**26  # G*N*K below this: one fixed tile, no autotuning (compile once, launch fast)
FIXED = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
INTERPRET_FIXED = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}  # few, large CPU tiles


def prune_to_fit(configs, named_args, limit: int = 200 * 1024, x_staged: bool = False, **meta):
    """Keep the configs whose operand tiles fit in ``limit`` bytes of shared memory (else the
    last): the x tile once, or with ``x_staged`` (x walked in chunks) once per stage."""
    esize = named_args["X"].element_size()
    keep = [c for c in configs
            if (c.kwargs["BLOCK_N"] * (c.num_stages if x_staged else 1) + c.kwargs["BLOCK_K"] * c.num_stages)
            * meta["BLOCK_D"] * esize <= limit]
    return keep or configs[-1:]


def tile_choice(kernel, work: int, interpret: bool, interpret_tile: dict = INTERPRET_FIXED,
                fixed_tile: dict = FIXED) -> tuple[Any, dict]:
    """``(kernel to launch, its tile)`` for a ``triton.autotune``-wrapped kernel: the wrapper
    itself (autotuned per key, cached) when the problem is large, else its plain ``jit``
    function with one fixed tile (``interpret_tile`` under the interpreter)."""
    if interpret:
        return kernel.fn, interpret_tile
    return (kernel.fn, fixed_tile) if work < TUNE_MIN_WORK else (kernel, {})


def launch(kernel, grid, work: int, *args, interpret_tile: dict = INTERPRET_FIXED, fixed_tile: dict = FIXED,
           **meta) -> None:
    """Run a ``triton.autotune``-wrapped kernel with the tile :func:`tile_choice` picks."""
    chosen, tile = tile_choice(kernel, work, _interpret(), interpret_tile, fixed_tile)
    relaunch.launch(chosen, grid, *args, **meta, **tile)


@triton.jit
def _row_terms_kernel(C, BIAS, SCALE, K, D, scg, sck, scd, COSINE: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-codeword ``b_k`` and ``a_k`` (see module docstring) in fp32, ``(G, K)``."""
    g = tl.program_id(1).to(tl.int64)
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m = (kk[:, None] < K) & (d0 + dd[None, :] < D)
        c = tl.load(C + g * scg + kk[:, None].to(tl.int64) * sck + (d0 + dd[None, :]) * scd, mask=m, other=0.0)
        c = c.to(tl.float32)
        acc += tl.sum(c * c, axis=1)
    if COSINE:
        bias = tl.zeros([BLOCK_K], dtype=tl.float32)
        scale = 1.0 / tl.maximum(tl.sqrt(acc), COS_EPS)
    else:
        bias = 0.5 * acc
        scale = tl.full([BLOCK_K], 1.0, tl.float32)
    tl.store(BIAS + g * K + kk, bias, mask=kk < K)
    tl.store(SCALE + g * K + kk, scale, mask=kk < K)


@triton.jit
def _score_tile(x, X_row, rmask, C_tile, kk, kmask, dd, D, sxd, scd, BIAS_g, SCALE_g, COSINE: tl.constexpr,
                ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    """``s = b_k - a_k x.c_k`` for one ``(BLOCK_N, BLOCK_K)`` tile; columns past the
    split get ``+inf`` through their bias. ``DOT_F32`` (interpreter only, whose bf16 dot
    is wrong) upcasts the operands first: bf16 products are exact in fp32 anyway."""
    if ONE_CHUNK:
        c = tl.load(C_tile + dd[:, None] * scd, mask=kmask[None, :] & (dd[:, None] < D), other=0.0)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), c.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(x, c, input_precision=PRECISION)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dm = d0 + dd < D
            xc = tl.load(X_row + (d0 + dd[None, :]) * sxd, mask=rmask[:, None] & dm[None, :], other=0.0)
            c = tl.load(C_tile + (d0 + dd[:, None]) * scd, mask=kmask[None, :] & dm[:, None], other=0.0)
            if DOT_F32:
                acc = tl.dot(xc.to(tl.float32), c.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xc, c, acc, input_precision=PRECISION)
    bias = tl.load(BIAS_g + kk, mask=kmask, other=float("inf"))
    if COSINE:
        scale = tl.load(SCALE_g + kk, mask=kmask, other=0.0)
        return acc * (-scale[None, :]) + bias[None, :]
    return bias[None, :] - acc


@triton.jit
def _row_offset(x_sq, COSINE: tl.constexpr):
    """What turns a score back into a distance: ``|x|^2`` (l2) or ``1 / |x|`` (cosine); NaN for a
    row holding NaN (the clamp keeps it)."""
    if COSINE:
        return 1.0 / tl.maximum(tl.sqrt(x_sq), COS_EPS, propagate_nan=tl.PropagateNan.ALL)
    return x_sq


@triton.jit
def _finish(score, off, COSINE: tl.constexpr):
    """Distance from score: ``max(|x|^2 + 2 s, 0)`` (l2) or ``1 + s / |x|`` (cosine); a NaN row's
    stays NaN (the clamp keeps it), as on the torch path."""
    if COSINE:
        return 1.0 + score * off
    return tl.maximum(off + 2.0 * score, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_rows(X_row, rmask, dd, D, sxd, ONE_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The x tile (kept for the whole walk when ``ONE_CHUNK``) and fp32 ``|x|^2``."""
    x = tl.load(X_row + dd[None, :] * sxd, mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    xf = x.to(tl.float32)
    x_sq = tl.sum(xf * xf, axis=1)
    if not ONE_CHUNK:
        for d0 in range(BLOCK_D, D, BLOCK_D):
            xc = tl.load(X_row + (d0 + dd[None, :]) * sxd, mask=rmask[:, None] & (d0 + dd[None, :] < D), other=0.0)
            xc = xc.to(tl.float32)
            x_sq += tl.sum(xc * xc, axis=1)
    return x, x_sq


@triton.jit
def merge_rows(PS, PI, base, rmask, N, S):
    """Best ``(score, index)`` over ``S`` partials at ``base + s N``, in split (= index)
    order; strict ``<`` keeps the earlier split on ties. Scores may be fp32 or int32."""
    best = tl.load(PS + base, mask=rmask, other=0)
    bi = tl.load(PI + base, mask=rmask, other=0)
    for s in range(1, S):
        v = tl.load(PS + base + s * N, mask=rmask, other=0)
        i = tl.load(PI + base + s * N, mask=rmask, other=0)
        lt = v < best
        best = tl.where(lt, v, best)
        bi = tl.where(lt, i, bi)
    return best, bi


# -- host side --------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: small, so that CPU tests also take the split path


@functools.cache
def _cuda_sms(index: int) -> int:
    """SM count, cached: reading the device properties every call showed in a profile."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def aligned(numel: int) -> int:
    """``numel`` rounded up to 4 elements (16 bytes of 4-byte values): buffers carved out of
    one allocation at these offsets keep Triton's 16-byte pointer specialisation."""
    return -(-numel // 4) * 4


def _split_plan(g: int, n: int, k: int, device: torch.device, split_k: int | None,
                max_split: int | None = None, unsplit_waves: int = 2) -> tuple[int, int]:
    """``(S, K_SPLIT)``: split the codebook when the row blocks (128 rows each) cannot
    fill ``unsplit_waves`` waves of the GPU (one per SM), into enough splits for two
    waves; each split covers a multiple of ``SPLIT_QUANTUM`` codes, and at most
    ``max_split`` (a multiple of it) when given."""
    if split_k is None:
        blocks = g * cdiv(n, 128 if device.type == "cuda" else 64)
        sms = _num_sms(device)
        split_k = 1 if blocks >= unsplit_waves * sms else max(1, cdiv(2 * sms, blocks))
    k_split = cdiv(cdiv(k, max(1, split_k)), SPLIT_QUANTUM) * SPLIT_QUANTUM
    if max_split is not None:
        k_split = min(k_split, max_split)
    return cdiv(k, k_split), k_split


def _block_d(d: int, esize: int) -> tuple[int, bool]:
    """``(BLOCK_D, ONE_CHUNK)``: the whole padded row when it is small, else 64-wide chunks."""
    bd = max(16, next_pow2(d))
    if bd * esize <= MAX_ONE_CHUNK_BYTES:
        return bd, True
    return 64, False


def codeword_terms(codebook: Tensor, cosine: bool) -> tuple[Tensor, Tensor]:
    """fp32 ``(bias, scale)``, each ``(G, K)``, of a ``(G, K, d)`` codebook (no fp32 copy)."""
    g, k, d = codebook.shape
    seg = aligned(g * k)
    both = torch.empty(2 * seg, device=codebook.device, dtype=torch.float32)  # one allocation
    bias, scale = both[:g * k].view(g, k), both[seg:seg + g * k].view(g, k)
    bd = min(128, max(16, next_pow2(d)))
    relaunch.launch(_row_terms_kernel, (cdiv(k, 64), g), codebook, bias, scale, k, d, *codebook.stride(),
                    COSINE=cosine, BLOCK_K=64, BLOCK_D=bd)
    return bias, scale


def new_outputs(x: Tensor, write_dist: bool, *tail: int) -> tuple[Tensor, Tensor]:
    """Unwritten fp32 distances (empty unless ``write_dist``) and int64 indices, each
    ``(G, N, *tail)`` for ``x (G, N, d)`` (``(N, *tail)`` for ``x (N, d)``)."""
    shape = (*x.shape[:-1], *tail)
    dist = torch.empty(shape, device=x.device, dtype=torch.float32) if write_dist else x.new_empty(0, dtype=torch.float32)
    return dist, torch.empty(shape, device=x.device, dtype=torch.int64)
