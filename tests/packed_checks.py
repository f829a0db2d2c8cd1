"""Check groups of the packed-key search (``tokenizers_vq.kernels.packed``); each takes a
device. Run by ``tests/kernels/test_nearest.py`` in the interpreter and on the GPU."""

from __future__ import annotations

import contextlib
import itertools
from types import MappingProxyType

import torch

from nearest_checks import DTYPES, _check_search, _data

from tokenizers_vq.kernels.plan import DEFAULT_PLAN

PACKED = ("bf16", "fp32_tf32")  # what algorithm="packed" runs on; other dtypes fall back to the tiled kernel


plan = DEFAULT_PLAN.replace  # plan(**changes): the default search plan with changes


@contextlib.contextmanager
def packed_calls():
    """Counts the searches the packed kernel really ran (``calls[0]``), so a case that
    qualifies cannot pass by silently falling back to the tiled kernel."""
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415

    calls, real = [0], packed_launch.nearest_packed

    def spy(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    packed_launch.nearest_packed = spy
    try:
        yield calls
    finally:
        packed_launch.nearest_packed = real


def check_packed_odd_shapes(device, full=False):
    """``algorithm="packed"``, l2, bf16 and fp32_tf32 in turn: N in {1, 7, 300}, D in
    {1, 3, 8, 10, 12, 16, 24, 32, 100, 200, 256} (12, 16, 32 and 256 have no spare padding
    columns: bf16 12 and 16 pad to a 32-wide row and 32 to a 64-wide one, otherwise the norms go in a second dot,
    or at 256 in the dot's initial accumulator;
    rows wider than ``SearchPlan.max_row_bytes`` run the tiled kernel:
    fp32 at 100 and up), K in {1, 17, 700}; on CPU the 300 x 700 cases for two D only."""
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415

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
        one_chunk = padded * dt.itemsize <= plan().max_row_bytes[dt]
        if not spare and d <= plan().pad_up_max_d.get(dt, 0):  # or one dot over a row twice as wide
            assert packed_launch.layout(dt, d) == (2 * padded, 0), (d, name)
        elif not spare and one_chunk and d <= plan().ext_max_d[dt]:
            assert packed_launch.layout(dt, d) == (padded, 16), (d, name)
        assert calls[0] == int(one_chunk and (spare or d <= plan().ext_max_d[dt])), (n, d, k, name, calls[0])


def check_packed_ties_splits_groups(device, full=False):
    """Packed: exact duplicate codewords within a tile, across tiles and across splits go
    to the lowest index, with the default tile bits and with 2 (every tile number
    used, splits forced); G codebooks equal G searches; strided views and
    ``return_dist=False``; the norms both ways (second dot, initial accumulator) where the
    row has no spare columns; what it does not cover (cosine, fp16, ieee, top-k, a c_aug
    over ``SearchPlan.max_aug_bytes``) runs the tiled kernel."""
    from tokenizers_vq.kernels import packed, packed_launch  # noqa: PLC0415
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415
    from tokenizers_vq.kernels.tiles import FIXED, SPLIT_QUANTUM  # noqa: PLC0415

    for bits, wide in itertools.product((plan().tile_bits, 2), (False, True)):  # tags of every tile in range
        cols = packed.MIN_TAG_COLS[wide]
        if 2**bits * cols < SPLIT_QUANTUM:  # too few tag bits for one split of these tiles: refused
            assert not packed_launch.applies(torch.bfloat16, 256 if wide else 8, "l2", "tf32", plan=plan(tile_bits=bits))
            try:
                packed_launch.max_split(bits, cols)
                raise AssertionError(f"tile_bits={bits} with {cols} codes per tag was not refused")
            except ValueError:
                continue
        for tile in packed.tile_set(wide):
            assert packed_launch.max_split(bits, cols) // packed.tag_cols(tile) <= 2**bits, tile
    assert FIXED in packed.tile_set(False) and packed.WIDE_FIXED in packed.tile_set(True)
    for name, split, bits, base in itertools.product(PACKED, (None, 1, 3), (plan().tile_bits, 2), (20, 300)):
        if base == 20 and split is not None:
            continue
        dt = DTYPES[name][0]
        c0 = _data((base, 5), dt, device)
        idx = _check_search(_data((37, 5), dt, device), torch.cat([c0, c0, c0]), "l2", name, split_k=split,
                            algorithm="packed", plan=plan(tile_bits=bits))
        assert (idx < base).all(), "tie not broken to the lowest index"
    for name in PACKED:
        dt = DTYPES[name][0]
        x, c = _data((3, 50, 8), dt, device), _data((3, 200, 8), dt, device)
        _check_search(x, c, "l2", name, algorithm="packed", plan=plan(tile_bits=2))
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
        tiled = nearest_codes_triton(algorithm="tiled", **args)
        assert calls[0] == 0 and torch.equal(ours[0], tiled[0]) and torch.equal(ours[1], tiled[1]), f"packed {kw} is not the tiled kernel"
    with packed_calls() as calls:
        nearest_codes_triton(x, c, algorithm="packed")
    assert calls[0] == 1, "a qualifying search did not run the packed kernel"
    # rows without spare columns, the norms both ways: initial accumulator (0) and second dot (2^30); d = 12 and
    # 32 in bf16 too take the second dot here, not a row twice as wide
    for (n, d, k), name, at in itertools.product(((7, 12, 17), (300, 32, 700), (37, 256, 300)), PACKED, (0, 2**30)):
        if name == "fp32_tf32" and d > plan().ext_max_d[torch.float32]:
            continue
        both = plan(pad_up_max_d=MappingProxyType({}), norm_init_min_block_d=at)
        dt = DTYPES[name][0]
        with packed_calls() as calls:
            for split in (None, 3):
                _check_search(_data((n, d), dt, device), _data((k, d), dt, device), "l2", name, split_k=split,
                              algorithm="packed", plan=both)
        assert calls[0] == 2, (n, d, k, name)
    # codes holding Inf or NaN are never chosen (as in the tiled kernel): the same ids as with
    # those codes moved far away, in every layout of the norms
    for name, split, d, at in itertools.product(PACKED, (None, 3), (8, 32), (0, 2**30)):
        dt = DTYPES[name][0]
        q, far = _data((40, d), dt, device), _data((300, d), dt, device)
        bad = far.clone()
        bad[5, 0], bad[77, d - 1], bad[150] = float("inf"), float("nan"), -float("inf")
        far[[5, 77, 150]] = 1e4
        layout = plan(pad_up_max_d=MappingProxyType({}), norm_init_min_block_d=at)
        with packed_calls() as calls:
            ids = [nearest_codes_triton(q, cb, split_k=split, algorithm="packed", plan=layout)[1] for cb in (bad, far)]
        assert calls[0] == 2 and torch.equal(ids[0], ids[1]), (name, split, d, at)
    capped = plan(max_aug_bytes=packed_launch.aug_bytes(torch.float32, 1, 70, 8) - 1)  # c_aug one byte over: the tiled kernel
    with packed_calls() as calls:
        ours = nearest_codes_triton(x, c, algorithm="packed", plan=capped)
    tiled = nearest_codes_triton(x, c, algorithm="tiled")
    assert calls[0] == 0 and torch.equal(ours[1], tiled[1]), "a c_aug over max_aug_bytes did not fall back to the tiled kernel"


def check_packed_half(device, full=False):
    """Packed ``HALF`` tiles (two half-tile dots per tile, tags ``2t`` and ``2t + 1``, one
    3-input min): odd shapes in bf16 and fp32_tf32, split and not (the norms in the row, in a
    row twice as wide, or in the initial accumulator); exact duplicates within a
    half tile, across the halves, tiles and splits go to the lowest index (the fewest
    tile bits that leave one 256-code split force the splits); the same indices and distances as whole tiles; on the GPU, the
    inline-PTX epilogue (``SearchPlan.use_asm``) equals the plain one."""
    from tokenizers_vq.kernels import packed, packed_launch  # noqa: PLC0415
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
            if not packed_launch.applies(dt, d, "l2", "tf32", 1, k):
                name, dt = "bf16", torch.bfloat16
            x, c = _data((n, d), dt, device), _data((k, d), dt, device)
            with packed_calls() as calls:
                got = _check_search(x, c, "l2", name, split_k=split, algorithm="packed", plan=plan(force_tile=tile))
                dist_h = nearest_codes_triton(x, c, split_k=split, plan=plan(force_tile=tile))[0]
            assert calls[0] == 2, (n, d, k, name)
            dist_w, idx_w = nearest_codes_triton(x, c, split_k=split, plan=plan(force_tile=whole))
            assert torch.equal(got[:, 0], idx_w.cpu()) and torch.equal(dist_h, dist_w), ("HALF != whole", n, d, k, name)
        fewest = max(2, (256 // packed.tag_cols(half)).bit_length() - 1)  # fewest tile bits with one 256-code split
        for name, split, bits in itertools.product(PACKED, (None, 3), (plan().tile_bits, fewest)):
            dt = DTYPES[name][0]
            c0 = _data((150, 5), dt, device)
            forced = plan(force_tile=half, tile_bits=bits)
            idx = _check_search(_data((37, 5), dt, device), torch.cat([c0, c0, c0]), "l2", name, split_k=split,
                                algorithm="packed", plan=forced)
            assert (idx < 150).all(), "tie across halves, tiles or splits not broken to the lowest index"
            idx = _check_search(_data((37, 5), dt, device), c0.repeat_interleave(3, 0), "l2", name, split_k=split,
                                algorithm="packed", plan=forced)
            assert (idx % 3 == 0).all(), "tie within a half tile not broken to the lowest index"
    if device != "cpu":
        for d, k in ((8, 5000), (32, 3000), (100, 2000), (256, 1000)):
            x, c = _data((3000, d), torch.bfloat16, device), _data((k, d), torch.bfloat16, device)
            outs = [nearest_codes_triton(x, c, plan=plan(use_asm=asm)) for asm in (True, False)]
            assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0]), ("use_asm", d)
