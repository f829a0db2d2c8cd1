"""Triton nearest-code search and code statistics against an fp64 reference.

The checks are plain functions of a device. On a CPU machine they run once, in a
subprocess under ``TRITON_INTERPRET=1`` (Triton reads it when ``@triton.jit``
decorates, so it must be set before the kernel module is first imported anywhere);
with CUDA they also run in-process on the GPU over a larger grid.

An index may differ from the fp64 argmin only where the two distances differ by less
than the rounding bound of the search arithmetic for that input dtype:
``|d(x, c) - fl(d(x, c))| <= (2 u_in + (d + 4) u_32) (|x| + |c|)^2`` for ``l2``
(``u_in`` = 2^-11 for tf32 operands, 0 for exact fp32 or bf16/fp16 operands, whose
products are exact in fp32; ``u_32`` = 2^-24 for fp32 accumulation), and the same
without the ``(|x| + |c|)^2`` factor for ``cosine``. Two of those, times 2 for slack.

``algorithm="packed"`` sums ``d + 6`` terms in its dot (within that slack) and compares
distances truncated to ``23 - TILE_BITS`` mantissa bits, so its indices may also
differ where the two best distances differ by less than ``2^-(23 - TILE_BITS)`` times
the distance: the index check adds twice that (of the best distance plus the bound);
its distances, recomputed in fp32, must meet the bound as they are.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F

DTYPES = {  # name -> (torch dtype, precision, operand rounding u_in)
    "fp32_tf32": (torch.float32, "tf32", 2.0**-11),
    "fp32_ieee": (torch.float32, "ieee", 0.0),
    "bf16": (torch.bfloat16, "tf32", 0.0),
    "fp16": (torch.float16, "tf32", 0.0),
}
POISON_F, POISON_I = float("nan"), -(2**40)


@contextlib.contextmanager
def poisoned_outputs():
    """Every ``torch.empty``/``empty_like`` inside is filled with NaN (floats) or a
    negative sentinel (integers), so an unwritten output element cannot pass."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(POISON_F) if t.is_floating_point() else t.fill_(POISON_I if t.dtype == torch.int64 else -7)

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def _data(shape, dtype, device):
    """Fresh random, never zero: a random offset and scale per call."""
    scale = 0.5 + torch.rand(()).item() * 2
    return (torch.randn(shape, dtype=torch.float64) * scale + 0.3 * torch.randn(())).to(dtype).to(device)


def _dist64(x, c, metric):
    """fp64 ``(..., N, K)`` distances of the values actually stored in ``x``, ``c``."""
    x, c = x.double().cpu(), c.double().cpu()
    if metric == "cosine":
        return 1.0 - F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).transpose(-1, -2)
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.transpose(-1, -2) + c.pow(2).sum(-1).unsqueeze(-2)).clamp_min(0)


def _tol(x, c, metric, u_in):
    """Per-row bound ``(..., N, 1)`` on |computed - exact| distance, times 4 (see module doc)."""
    d = x.shape[-1]
    unit = 2 * u_in + (d + 4) * 2.0**-24
    if metric == "cosine":
        return torch.full(x.shape[:-1] + (1,), 4 * (unit + 8 * 2.0**-24), dtype=torch.float64)
    xn = x.double().cpu().norm(dim=-1, keepdim=True)
    cn = c.double().cpu().norm(dim=-1).amax(-1, keepdim=True).unsqueeze(-1) if c.ndim == 3 else c.double().cpu().norm(dim=-1).max()
    return 4 * unit * (xn + cn) ** 2


def _check_search(x, c, metric, dtype_name, k=None, split_k=None, dist_out=True, algorithm="v1"):
    from tokenizers_vq.kernels import packed  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    _, precision, u_in = DTYPES[dtype_name]
    with poisoned_outputs():
        dist, idx = nearest_codes_triton(x, c, metric=metric, k=k, precision=precision, split_k=split_k,
                                         return_dist=dist_out, algorithm=algorithm)
    kk = 1 if k is None else k
    lead = x.shape[:-1] + (() if k is None else (k,))
    assert idx.shape == lead and idx.dtype == torch.int64, (idx.shape, idx.dtype)
    idx = idx.cpu().reshape(*x.shape[:-1], kk)
    ncode = c.shape[-2]
    assert ((idx >= 0) & (idx < ncode)).all(), "index out of range or unwritten"
    ref = _dist64(x, c, metric)
    tol = _tol(x, c, metric, u_in)
    chosen = ref.gather(-1, idx)
    kth = ref.sort(dim=-1).values[..., :kk]
    tol_idx = tol + 2 * 2.0 ** -(23 - packed.TILE_BITS) * (kth + tol) if algorithm == "packed" else tol
    bad = chosen - kth > tol_idx  # each returned code is within tol of the true j-th best
    assert not bad.any(), f"{int(bad.sum())} picks worse than the reference by more than the rounding bound"
    if kk > 1:
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "duplicate indices in top-k"
    if dist_out:
        dist = dist.cpu().double().reshape(*x.shape[:-1], kk)
        assert torch.isfinite(dist).all(), "distance unwritten or not finite"
        err = (dist - chosen).abs()
        assert (err <= tol).all(), f"distance error {float((err - tol).max()):.3g} above bound"
        assert (dist.diff(dim=-1) >= 0).all(), "top-k distances not ascending"
    else:
        assert dist is None
    return idx


# -- groups of checks; each takes a device ---------------------------------------------
def check_odd_shapes(device, full=False):
    """N in {1, 7, 1000}, D in {1, 3, 5, 24, 100}, K in {1, 17, 1000}; dtypes and metrics
    rotate over the grid (compiles, not runs, cost time on the GPU); on CPU N = K = 1000
    runs for two D only."""
    names = list(DTYPES)
    for i, (n, d, k) in enumerate(itertools.product((1, 7, 1000), (1, 3, 5, 24, 100), (1, 17, 1000))):
        if n * k == 10**6 and d not in (5, 100) and not full:  # the interpreter is slow: two 1000 x 1000 cases
            continue
        combos = [(names[i % 4], "l2"), (names[(i + 1) % 4], "cosine")] if n < 1000 or full else [(names[i % 4], "l2")]
        for name, metric in combos:
            dt = DTYPES[name][0]
            _check_search(_data((n, d), dt, device), _data((k, d), dt, device), metric, name)


def check_ties_and_splits(device, full=False):
    """Exact duplicate codewords across tiles and splits: the lowest index must win,
    in top-1 (v1 and the default, packed, kernel) and top-k, whether or not the
    codebook is split."""
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    base = 300
    for name, split in itertools.product(("fp32_tf32", "bf16"), (None, 1, 3)):
        dt, prec, _ = DTYPES[name]
        c0 = _data((base, 5), dt, device)
        c = torch.cat([c0, c0, c0])
        x = _data((37, 5), dt, device)
        for alg in ("v1", "auto"):
            _, i1 = nearest_codes_triton(x, c, precision=prec, split_k=split, algorithm=alg)
            assert (i1 < base).all(), "tie not broken to the lowest index"
        # top-k against v1's top-1 (the packed kernel, "auto", may pick another code on a near-tie of two
        # distinct codes within its 2^-13 key resolution, which random data meets now and then)
        _, i1 = nearest_codes_triton(x, c, precision=prec, split_k=split, algorithm="v1")
        _, ik = nearest_codes_triton(x, c, k=3, precision=prec, split_k=split)
        assert torch.equal(ik, i1[:, None] + torch.tensor([0, base, 2 * base], device=device)), "top-k tie order"


def check_topk(device, full=False):
    shapes = ((7, 5, 17), (300, 24, 700), (2000, 64, 3000)) if full else ((7, 5, 17), (40, 24, 300))
    for (n, d, kc), k, metric in itertools.product(shapes, (2, 8), ("l2", "cosine")):
        name = "fp32_ieee" if k == 8 else "bf16"
        dt = DTYPES[name][0]
        for split in (None, 2):
            _check_search(_data((n, d), dt, device), _data((kc, d), dt, device), metric, name, k=k, split_k=split)


def check_grouped_and_layouts(device, full=False):
    """G codebooks in one launch equal G separate searches; strided views and
    ``return_dist=False`` work."""
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    for name, metric in (("fp32_ieee", "l2"), ("fp16", "cosine")):
        dt = DTYPES[name][0]
        x, c = _data((3, 50, 12), dt, device), _data((3, 90, 12), dt, device)
        _check_search(x, c, metric, name)
        dist, idx = nearest_codes_triton(x, c, metric=metric, precision=DTYPES[name][1])
        for g in range(3):
            dg, ig = nearest_codes_triton(x[g], c[g], metric=metric, precision=DTYPES[name][1])
            assert torch.equal(ig, idx[g]) and torch.equal(dg, dist[g]), "grouped != per group"
        _check_search(x, c, metric, name, k=4)
    xt = _data((24, 40), torch.float32, device).t()  # (40, 24), stride (1, 40)
    ct = _data((60, 48), torch.float32, device)[:, ::2]  # (60, 24), stride (48, 2)
    _check_search(xt, ct, "l2", "fp32_ieee")
    _check_search(xt, ct, "l2", "fp32_ieee", dist_out=False)


PACKED = ("bf16", "fp32_tf32")  # what algorithm="packed" runs on; other dtypes fall back to v1


@contextlib.contextmanager
def tile_bits(bits):
    """Packed keys with ``bits`` tile bits: small codebooks then use every tile number
    and need the splits that keep it in range."""
    from tokenizers_vq.kernels import packed  # noqa: PLC0415

    old, packed.TILE_BITS = packed.TILE_BITS, bits
    try:
        yield
    finally:
        packed.TILE_BITS = old


@contextlib.contextmanager
def packed_calls():
    """Counts the searches the packed kernel really ran (``calls[0]``), so a case that
    qualifies cannot pass by silently falling back to v1."""
    from tokenizers_vq.kernels import packed  # noqa: PLC0415

    calls, real = [0], packed.nearest_packed

    def spy(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    packed.nearest_packed = spy
    try:
        yield calls
    finally:
        packed.nearest_packed = real


def check_packed_odd_shapes(device, full=False):
    """``algorithm="packed"``, l2, bf16 and fp32_tf32 in turn: N in {1, 7, 300}, D in
    {1, 3, 8, 10, 12, 16, 24, 32, 100, 200, 256} (12, 16, 32 and 256 have no spare padding
    columns: bf16 12 and 16 pad to a 32-wide row and 32 to a 64-wide one, otherwise the norms go in a second dot,
    or at 256 in the dot's initial accumulator;
    rows wider than ``MAX_ROW_BYTES`` run v1:
    fp32 at 100 and up), K in {1, 17, 700}; on CPU the 300 x 700 cases for two D only."""
    from tokenizers_vq.kernels import packed  # noqa: PLC0415

    big = 1000 if full else 300
    for i, (n, d, k) in enumerate(itertools.product((1, 7, big), (1, 3, 8, 10, 12, 16, 24, 32, 100, 200, 256), (1, 17, 700))):
        if n == big and k == 700 and d not in (8, 24) and not full:
            continue
        name = PACKED[i % 2]
        dt = DTYPES[name][0]
        with packed_calls() as calls:
            _check_search(_data((n, d), dt, device), _data((k, d), dt, device), "l2", name, algorithm="packed")
        padded = max(16, 1 << (d - 1).bit_length())
        spare = d + 6 <= padded  # the padded row has 6 free columns: one dot, else a second for the norms
        if not spare and d <= packed.PAD_UP_MAX_D.get(dt, 0):  # or one dot over a row twice as wide
            assert packed.layout(dt, d) == (2 * padded, 0), (d, name)
        elif not spare and one_chunk and d <= packed.EXT_MAX_D[dt]:
            assert packed.layout(dt, d) == (padded, 16), (d, name)
        one_chunk = padded * dt.itemsize <= packed.MAX_ROW_BYTES[dt]
        assert calls[0] == int(one_chunk and (spare or d <= packed.EXT_MAX_D[dt])), (n, d, k, name, calls[0])


def check_packed_ties_splits_groups(device, full=False):
    """Packed: exact duplicate codewords within a tile, across tiles and across splits go
    to the lowest index, with the default ``TILE_BITS`` and with 2 (every tile number
    used, splits forced); G codebooks equal G searches; strided views and
    ``return_dist=False``; the norms both ways (second dot, initial accumulator) where the
    row has no spare columns; what it does not cover (cosine, fp16, ieee, top-k, a c_aug
    over ``MAX_AUG_BYTES``) runs v1."""
    from tokenizers_vq.kernels import packed  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import FIXED, nearest_codes_triton  # noqa: PLC0415

    for bits in (packed.TILE_BITS, 2):  # every tile a launch may pick keeps its tags in range
        for tile in [c.kwargs for c in packed._configs()] + [FIXED, packed.INTERPRET_TILE]:
            assert packed.max_split(bits) // packed.tag_cols(tile) <= 2**bits, tile
    for name, split, bits, base in itertools.product(PACKED, (None, 1, 3), (packed.TILE_BITS, 2), (20, 300)):
        if base == 20 and split is not None:
            continue
        dt = DTYPES[name][0]
        c0 = _data((base, 5), dt, device)
        with tile_bits(bits):
            idx = _check_search(_data((37, 5), dt, device), torch.cat([c0, c0, c0]), "l2", name, split_k=split,
                                algorithm="packed")
        assert (idx < base).all(), "tie not broken to the lowest index"
    for name in PACKED:
        dt = DTYPES[name][0]
        x, c = _data((3, 50, 8), dt, device), _data((3, 200, 8), dt, device)
        with tile_bits(2):
            _check_search(x, c, "l2", name, algorithm="packed")
        dist, idx = nearest_codes_triton(x, c, algorithm="packed")
        for g in range(3):
            dg, ig = nearest_codes_triton(x[g], c[g], algorithm="packed")
            assert torch.equal(ig, idx[g]) and torch.equal(dg, dist[g]), "grouped != per group"
    xt = _data((24, 40), torch.float32, device).t()  # (40, 24), stride (1, 40)
    ct = _data((600, 48), torch.float32, device)[:, ::2]  # (600, 24), stride (48, 2)
    for split in (None, 2):
        _check_search(xt, ct, "l2", "fp32_tf32", split_k=split, algorithm="packed")
        _check_search(xt, ct, "l2", "fp32_tf32", split_k=split, dist_out=False, algorithm="packed")
    x, c = _data((9, 8), torch.float32, device), _data((70, 8), torch.float32, device)
    for kw in (dict(metric="cosine"), dict(precision="ieee"), dict(k=2), dict(x=x.half(), codebook=c.half())):
        args = dict(x=x, codebook=c) | kw
        with packed_calls() as calls:
            ours = nearest_codes_triton(algorithm="packed", **args)
        v1 = nearest_codes_triton(algorithm="v1", **args)
        assert calls[0] == 0 and torch.equal(ours[0], v1[0]) and torch.equal(ours[1], v1[1]), f"packed {kw} is not v1"
    with packed_calls() as calls:
        nearest_codes_triton(x, c, algorithm="packed")
    assert calls[0] == 1, "a qualifying search did not run the packed kernel"
    old_init, old_pad = packed.NORM_INIT_MIN_BLOCK_D, packed.PAD_UP_MAX_D
    packed.PAD_UP_MAX_D = {}  # d = 12 and 32 in bf16 too take the second dot here, not a row twice as wide
    try:  # rows without spare columns, the norms both ways: initial accumulator (0) and second dot (2^30)
        for (n, d, k), name, at in itertools.product(((7, 12, 17), (300, 32, 700), (37, 256, 300)), PACKED, (0, 2**30)):
            if name == "fp32_tf32" and d > packed.EXT_MAX_D[torch.float32]:
                continue
            packed.NORM_INIT_MIN_BLOCK_D = at
            dt = DTYPES[name][0]
            with packed_calls() as calls:
                for split in (None, 3):
                    _check_search(_data((n, d), dt, device), _data((k, d), dt, device), "l2", name, split_k=split,
                                  algorithm="packed")
            assert calls[0] == 2, (n, d, k, name)
    finally:
        packed.NORM_INIT_MIN_BLOCK_D, packed.PAD_UP_MAX_D = old_init, old_pad
    old_cap = packed.MAX_AUG_BYTES
    packed.MAX_AUG_BYTES = packed.aug_bytes(torch.float32, 1, 70, 8) - 1  # c_aug one byte over the cap: v1
    try:
        with packed_calls() as calls:
            ours = nearest_codes_triton(x, c, algorithm="packed")
    finally:
        packed.MAX_AUG_BYTES = old_cap
    v1 = nearest_codes_triton(x, c, algorithm="v1")
    assert calls[0] == 0 and torch.equal(ours[1], v1[1]), "a c_aug over MAX_AUG_BYTES did not fall back to v1"


@contextlib.contextmanager
def forced_tile(tile):
    """Every packed launch takes ``tile`` (``packed.FORCE_TILE``)."""
    from tokenizers_vq.kernels import packed  # noqa: PLC0415

    old, packed.FORCE_TILE = packed.FORCE_TILE, tile
    try:
        yield
    finally:
        packed.FORCE_TILE = old


def check_packed_half(device, full=False):
    """Packed ``HALF`` tiles (two half-tile dots per tile, tags ``2t`` and ``2t + 1``, one
    3-input min): odd shapes in bf16 and fp32_tf32, split and not (the norms in the row, in a
    row twice as wide, or in the initial accumulator); exact duplicates within a
    half tile, across the halves, tiles and splits go to the lowest index (the fewest
    ``TILE_BITS`` that leave one 256-code split force the splits); the same indices and distances as whole tiles; on the GPU, the
    inline-PTX epilogue (``USE_ASM``) equals the plain one."""
    from tokenizers_vq.kernels import packed  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    if device == "cpu":
        halves = [dict(packed.INTERPRET_TILE, HALF=True)]
    else:
        halves = [{"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "HALF": True},
                  {"BLOCK_N": 128, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3, "HALF": True}]
    cases = ((1, 3, 1), (7, 8, 17), (300, 32, 700), (37, 100, 300), (20, 256, 300)) if full or device != "cpu" else (
        (1, 3, 1), (7, 8, 17), (60, 32, 300), (37, 100, 150), (9, 128, 150))  # d = 128: NORM_INIT
    wide_half = {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2, "HALF": True}  # fits d = 256
    for half in halves:
        for i, ((n, d, k), split) in enumerate(itertools.product(cases, (None, 3))):
            tile = half if device == "cpu" or d <= 128 else wide_half
            whole = dict(tile, HALF=False)
            name = PACKED[i % 2]
            dt = DTYPES[name][0]
            if not packed.applies(dt, d, "l2", "tf32", 1, k):
                name, dt = "bf16", torch.bfloat16
            x, c = _data((n, d), dt, device), _data((k, d), dt, device)
            with forced_tile(tile), packed_calls() as calls:
                got = _check_search(x, c, "l2", name, split_k=split, algorithm="packed")
                dist_h = nearest_codes_triton(x, c, split_k=split)[0]
            assert calls[0] == 2, (n, d, k, name)
            with forced_tile(whole):
                dist_w, idx_w = nearest_codes_triton(x, c, split_k=split)
            assert torch.equal(got[:, 0], idx_w.cpu()) and torch.equal(dist_h, dist_w), ("HALF != whole", n, d, k, name)
        fewest = max(2, (256 // packed.tag_cols(half)).bit_length() - 1)  # least TILE_BITS with one 256-code split
        for name, split, bits in itertools.product(PACKED, (None, 3), (packed.TILE_BITS, fewest)):
            dt = DTYPES[name][0]
            c0 = _data((150, 5), dt, device)
            with forced_tile(half), tile_bits(bits):
                idx = _check_search(_data((37, 5), dt, device), torch.cat([c0, c0, c0]), "l2", name, split_k=split,
                                    algorithm="packed")
                assert (idx < 150).all(), "tie across halves, tiles or splits not broken to the lowest index"
                idx = _check_search(_data((37, 5), dt, device), c0.repeat_interleave(3, 0), "l2", name, split_k=split,
                                    algorithm="packed")
                assert (idx % 3 == 0).all(), "tie within a half tile not broken to the lowest index"
    if device != "cpu":
        old = packed.USE_ASM
        try:
            for d, k in ((8, 5000), (32, 3000), (100, 2000), (256, 1000)):
                x, c = _data((3000, d), torch.bfloat16, device), _data((k, d), torch.bfloat16, device)
                outs = []
                for asm in (True, False):
                    packed.USE_ASM = asm
                    outs.append(nearest_codes_triton(x, c))
                assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0]), ("USE_ASM", d)
        finally:
            packed.USE_ASM = old


def check_row_reduce(device, full=False):
    """v1 with ``ROW_REDUCE`` (each tile reduced to its rows at once; large ``d`` by
    default), forced on at every ``d``: odd shapes over dtypes and both metrics, split and
    not; exact duplicates across tiles and splits go to the lowest index; exact fp32 at
    d = 520 picks the same codes as the per-element walk."""
    from tokenizers_vq.kernels import nearest as nr  # noqa: PLC0415

    names = list(DTYPES)
    old = nr.ROW_REDUCE_MIN_D
    try:
        nr.ROW_REDUCE_MIN_D = 0
        cases = ((1, 3, 1), (7, 5, 17), (7, 100, 1000), (300, 24, 700), (37, 600, 300))
        for i, ((n, d, k), split) in enumerate(itertools.product(cases, (None, 3))):
            metric = ("l2", "cosine")[i % 2]
            name = names[i % 4]
            dt = DTYPES[name][0]
            _check_search(_data((n, d), dt, device), _data((k, d), dt, device), metric, name, split_k=split)
        for split in (None, 1, 3):
            c0 = _data((300, 40), torch.float32, device)
            idx = _check_search(_data((50, 40), torch.float32, device), torch.cat([c0, c0, c0]), "l2", "fp32_ieee",
                                split_k=split)
            assert (idx < 300).all(), "tie across tiles or splits not broken to the lowest index"
            idx = _check_search(_data((50, 40), torch.float32, device), c0.repeat_interleave(3, 0), "l2",
                                "fp32_ieee", split_k=split)
            assert (idx % 3 == 0).all(), "tie within a tile not broken to the lowest index"
        x, c = _data((30, 520), torch.float32, device), _data((200, 520), torch.float32, device)
        forced = nr.nearest_codes_triton(x, c, precision="ieee", algorithm="v1")
        nr.ROW_REDUCE_MIN_D = 2**30
        plain = nr.nearest_codes_triton(x, c, precision="ieee", algorithm="v1")
        assert torch.equal(forced[1], plain[1]), "ROW_REDUCE picks other codes than the per-element walk"
    finally:
        nr.ROW_REDUCE_MIN_D = old


def check_code_statistics(device, full=False):
    from tokenizers_vq.kernels.nearest import code_statistics_triton  # noqa: PLC0415

    for n, d, k in ((1, 3, 5), (500, 7, 40), (300, 130, 3)):
        x = _data((n, d), torch.float32, device)
        idx = torch.randint(0, k, (n,), device=device)
        with poisoned_outputs():
            counts, sums = code_statistics_triton(x, idx, k)
        ref_sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx.cpu(), x.double().cpu())
        ref_counts = torch.zeros(k, dtype=torch.float64).index_add_(0, idx.cpu(), torch.ones(n, dtype=torch.float64))
        assert torch.equal(counts.cpu().double(), ref_counts)
        torch.testing.assert_close(sums.cpu().double(), ref_sums, rtol=1e-5, atol=1e-5 * n)


def check_custom_op(device, full=False):
    """The registered op passes torch's opcheck (schema, fake tensor, dispatch)."""
    for args in ((_data((9, 6), torch.float32, device), _data((33, 6), torch.float32, device), "l2", 0, "ieee", True, 0),
                 (_data((2, 5, 3), torch.float32, device), _data((2, 8, 3), torch.float32, device), "cosine", 2, "ieee", False, 0),
                 (_data((9, 6), torch.bfloat16, device), _data((33, 6), torch.bfloat16, device), "l2", 0, "tf32", True, 0,
                  "packed")):
        torch.library.opcheck(torch.ops.tokenizers_vq.nearest_codes.default, args)
    x = _data((20, 4), torch.float32, device)
    torch.library.opcheck(torch.ops.tokenizers_vq.code_statistics.default, (x, torch.randint(0, 6, (20,), device=device), 6))


GROUPS = {f.__name__: f for f in (check_odd_shapes, check_ties_and_splits, check_topk, check_grouped_and_layouts,
                                  check_packed_odd_shapes, check_packed_ties_splits_groups, check_packed_half,
                                  check_row_reduce,
                                  check_code_statistics,
                                  check_custom_op)}


# -- CPU: all groups in one interpreter subprocess --------------------------------------
@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"interpreter run produced no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("group", list(GROUPS))
def test_interpreter(interpreter_results, group):
    assert interpreter_results[group] == "ok", interpreter_results[group]


# -- GPU: in-process ----------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group", list(GROUPS))
def test_gpu(group):
    GROUPS[group]("cuda", full=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_large_codebook():
    """K > 2^20 (int32 offsets times d), auto split for small N."""
    for name, algorithm in itertools.product(("bf16", "fp32_tf32"), ("v1", "packed")):  # packed: autotuned, split cap
        dt = DTYPES[name][0]
        _check_search(_data((64, 8), dt, "cuda"), _data((2**20 + 3, 8), dt, "cuda"), "l2", name, algorithm=algorithm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_replay_and_inductor_training_step():
    """The kernels capture into a CUDA graph (no host sync, no allocation outside the
    graph pool) and replay on new data; the VQ-EMA training forward compiles with
    inductor (fullgraph) on CUDA, custom ops inside, and matches eager."""
    import copy  # noqa: PLC0415

    from tokenizers_vq.kernels.nearest import code_statistics_triton, nearest_codes_triton  # noqa: PLC0415
    from tokenizers_vq.quantizers import VectorQuantizer  # noqa: PLC0415

    for dt, n, k, d in ((torch.bfloat16, 4096, 5000, 32), (torch.float32, 300, 70000, 8)):  # one-pass and split-K
        x, c = _data((n, d), dt, "cuda"), _data((k, d), dt, "cuda")
        idx_in = torch.randint(0, 50, (n,), device="cuda")
        nearest_codes_triton(x, c), code_statistics_triton(x, idx_in, 50)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dist, idx = nearest_codes_triton(x, c)
            counts, sums = code_statistics_triton(x, idx_in, 50)
        for _ in range(2):
            x.copy_(_data((n, d), dt, "cuda"))
            c.copy_(_data((k, d), dt, "cuda"))
            idx_in.copy_(torch.randint(0, 50, (n,), device="cuda"))
            graph.replay()
            ref_d, ref_i = nearest_codes_triton(x.clone(), c.clone())
            ref_counts, ref_sums = code_statistics_triton(x.clone(), idx_in.clone(), 50)
            assert torch.equal(idx, ref_i) and torch.equal(dist, ref_d)
            assert torch.equal(counts, ref_counts) and torch.equal(sums, ref_sums)

    torch.manual_seed(0)
    q = VectorQuantizer(32, 1000, restart_dead_codes=False, check_finite=False).cuda().train()  # restarts draw RNG
    q_eager = copy.deepcopy(q)
    compiled = torch.compile(q, fullgraph=True)
    for _ in range(3):  # training steps: search, EMA update, restarts, all inside the graph
        z = _data((8, 16, 16, 32), torch.float32, "cuda")
        out, ref = compiled(z), q_eager(z)
        assert torch.equal(out.codes, ref.codes)
        torch.testing.assert_close(out.quantized, ref.quantized)
    torch.testing.assert_close(q.embed, q_eager.embed)


def test_import_does_not_load_triton():
    code = "import sys, tokenizers_vq, tokenizers_vq.quantizers; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


if __name__ == "__main__":
    out = {}
    for name, fn in GROUPS.items():
        try:
            fn("cpu")
            out[name] = "ok"
        except Exception:  # noqa: BLE001  (reported to the parent test)
            out[name] = traceback.format_exc()
    print(json.dumps(out))
