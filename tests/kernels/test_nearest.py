"""Triton nearest-code search and code statistics against an fp64 reference, the fused EMA update
against the torch one.

The checks are plain functions of a device (the packed kernel's in
``tests/packed_checks.py``; the reference and the rounding bound in
``tests/nearest_checks.py``). On a CPU machine they run once, in a subprocess under
``TRITON_INTERPRET=1`` (Triton reads it when ``@triton.jit`` decorates, so it must be set
before the kernel module is first imported anywhere); with CUDA they also run in-process
on the GPU over a larger grid.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import traceback
from unittest import mock

import pytest
import torch

from nearest_checks import DTYPES, _check_search, _data, poisoned_outputs
from packed_checks import (
    check_packed_half,
    check_packed_odd_shapes,
    check_packed_ties_splits_groups,
)


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
    in top-1 (the tiled kernel and the default, packed, kernel) and top-k, whether or not the
    codebook is split."""
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    base = 300
    for name, split in itertools.product(("fp32_tf32", "bf16"), (None, 1, 3)):
        dt, prec, _ = DTYPES[name]
        c0 = _data((base, 5), dt, device)
        c = torch.cat([c0, c0, c0])
        x = _data((37, 5), dt, device)
        for alg in ("tiled", "auto"):
            _, i1 = nearest_codes_triton(x, c, precision=prec, split_k=split, algorithm=alg)
            assert (i1 < base).all(), "tie not broken to the lowest index"
        # top-k against the tiled kernel's top-1 (the packed kernel, "auto", may pick another code on a near-tie of two
        # distinct codes within its 2^-13 key resolution, which random data meets now and then)
        _, i1 = nearest_codes_triton(x, c, precision=prec, split_k=split, algorithm="tiled")
        _, ik = nearest_codes_triton(x, c, k=3, precision=prec, split_k=split)
        assert torch.equal(ik, i1[:, None] + torch.tensor([0, base, 2 * base], device=device)), "top-k tie order"


def _check_topk_shapes(device, full, k, name):
    shapes = ((7, 5, 17), (300, 24, 700), (2000, 64, 3000)) if full else ((7, 5, 17), (40, 24, 300))
    dt = DTYPES[name][0]
    for (n, d, kc), metric, split in itertools.product(shapes, ("l2", "cosine"), (None, 2)):
        _check_search(_data((n, d), dt, device), _data((kc, d), dt, device), metric, name, k=k, split_k=split)


def check_topk(device, full=False):
    """Top-2 in bf16 over odd shapes, both metrics, split and not."""
    _check_topk_shapes(device, full, 2, "bf16")


def check_topk_exact(device, full=False):
    """Top-8 in exact fp32 over the same shapes; rows and codes holding NaN."""
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    _check_topk_shapes(device, full, 8, "fp32_ieee")
    # a row with fewer than k finite scores (NaN) still gets k distinct codes, the lowest indices;
    # a NaN code is never among a finite row's best
    for split, kc in itertools.product((None, 3), (40, 300)):
        x, c = _data((5, 8), torch.float32, device), _data((kc, 8), torch.float32, device)
        x[2], c[7], c[kc - 3] = float("nan"), float("nan"), float("nan")
        _, idx = nearest_codes_triton(x, c, k=4, split_k=split, precision="ieee")
        assert idx[2].tolist() == [0, 1, 2, 3], idx[2]
        finite = idx[[0, 1, 3, 4]]
        assert not ((finite == 7) | (finite == kc - 3)).any() and all(len(set(r.tolist())) == 4 for r in idx)
        _, ref = nearest_codes_triton(x[[0, 1, 3, 4]], c.nan_to_num(1e4), k=4, split_k=split, precision="ieee")
        assert torch.equal(finite, ref)  # a NaN code in any tile leaves the others as they rank


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

def check_row_reduce(device, full=False):
    """The tiled kernel with ``ROW_REDUCE`` (each tile reduced to its rows at once; large ``d`` by
    default), forced on at every ``d``: odd shapes over dtypes and both metrics, split and
    not; exact duplicates across tiles and splits go to the lowest index; exact fp32 at
    d = 520 picks the same codes as the per-element walk."""
    from tokenizers_vq.kernels import nearest as nr  # noqa: PLC0415
    from tokenizers_vq.kernels.plan import DEFAULT_PLAN  # noqa: PLC0415

    names = list(DTYPES)
    on, off = (DEFAULT_PLAN.replace(row_reduce_min_d=v) for v in (0, 2**30))
    cases = ((1, 3, 1), (7, 5, 17), (7, 100, 1000), (300, 24, 700), (37, 600, 300))
    for i, ((n, d, k), split) in enumerate(itertools.product(cases, (None, 3))):
        metric = ("l2", "cosine")[i % 2]
        name = names[i % 4]
        dt = DTYPES[name][0]
        _check_search(_data((n, d), dt, device), _data((k, d), dt, device), metric, name, split_k=split, plan=on)
    for split in (None, 1, 3):
        c0 = _data((300, 40), torch.float32, device)
        idx = _check_search(_data((50, 40), torch.float32, device), torch.cat([c0, c0, c0]), "l2", "fp32_ieee",
                            split_k=split, plan=on)
        assert (idx < 300).all(), "tie across tiles or splits not broken to the lowest index"
        idx = _check_search(_data((50, 40), torch.float32, device), c0.repeat_interleave(3, 0), "l2",
                            "fp32_ieee", split_k=split, plan=on)
        assert (idx % 3 == 0).all(), "tie within a tile not broken to the lowest index"
    x, c = _data((30, 520), torch.float32, device), _data((200, 520), torch.float32, device)
    forced = nr.nearest_codes_triton(x, c, precision="ieee", algorithm="tiled", plan=on)
    plain = nr.nearest_codes_triton(x, c, precision="ieee", algorithm="tiled", plan=off)
    assert torch.equal(forced[1], plain[1]), "row_reduce picks other codes than the per-element walk"


def check_repeated_calls(device, full=False):
    """Calls that repeat a shape take the kept compiled kernel (:mod:`tokenizers_vq.kernels.relaunch`
    on the GPU): each repeat, and each change that Triton specialises on or that only the grid
    sees (group count, pointer alignment, strides, row count), still gives the reference's codes."""
    for name, alg, d in (("bf16", "auto", 8), ("bf16", "auto", 40), ("fp32_tf32", "auto", 8), ("fp32_ieee", "tiled", 24)):
        dt = DTYPES[name][0]
        c = _data((300, d), dt, device)
        for _ in range(2):
            _check_search(_data((70, d), dt, device), c, "l2", name, algorithm=alg)
        _check_search(_data((3, 70, d), dt, device), c.expand(3, -1, -1), "l2", name, algorithm=alg)  # G only in the grid
        _check_search(_data((70 * d + 1,), dt, device)[1:].view(70, d), c, "l2", name, algorithm=alg)  # unaligned x
        _check_search(_data((d, 70), dt, device).t(), c, "l2", name, algorithm=alg)  # strides
        _check_search(_data((71, d), dt, device), c, "l2", name, algorithm=alg, split_k=2)
        _check_search(_data((70, d), dt, device), c, "l2", name, algorithm=alg, dist_out=False)


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
    # codes sorted as int16 below 32767 codes and int32 above (40,000 programs: on the GPU
    # only); codes outside [0, k) are left out; codes of any integer dtype
    for n, k in ((200, 9), (200, 40_000)) if full else ((200, 9),):
        x = _data((n, 5), torch.float32, device)
        idx = torch.randint(0, k, (n,), device=device)
        idx[:6] = torch.tensor([-1, -40_000, k, k + 1, 2**20, -(2**20)])
        counts, sums = code_statistics_triton(x, idx, k)
        kept = idx[6:].cpu()
        ref_sums = torch.zeros(k, 5, dtype=torch.float64).index_add_(0, kept, x[6:].double().cpu())
        assert torch.equal(counts.cpu(), torch.bincount(kept, minlength=k).float())
        torch.testing.assert_close(sums.cpu().double(), ref_sums, rtol=1e-5, atol=1e-5 * n)
    # runs cut by chunk edges (128 sorted rows a chunk at d = 20): code 0 fills the first chunk, code 1
    # starts on the second chunk's first row and spans three chunks; the same bits on a second call
    idx = torch.cat([torch.zeros(128), torch.ones(300), torch.randint(2, 6, (272,)).float()]).long()
    idx = idx[torch.randperm(700)].to(device)
    x = _data((700, 20), torch.float32, device)
    counts, sums = code_statistics_triton(x, idx, 6)
    ref_sums = torch.zeros(6, 20, dtype=torch.float64).index_add_(0, idx.cpu(), x.double().cpu())
    assert torch.equal(counts.cpu(), torch.bincount(idx.cpu(), minlength=6).float())
    torch.testing.assert_close(sums.cpu().double(), ref_sums, rtol=1e-5, atol=1e-5 * 700)
    again = code_statistics_triton(x, idx, 6)
    assert torch.equal(again[0], counts) and torch.equal(again[1], sums)
    x = _data((60, 3), torch.float32, device)
    idx = torch.randint(0, 7, (60,), device=device)
    want = code_statistics_triton(x, idx, 7)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        got = code_statistics_triton(x, idx.to(dtype), 7)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), dtype
    import numpy as np  # noqa: PLC0415

    got = code_statistics_triton(x, idx, np.int64(7))  # a size read from an array
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def check_nonfinite_rows(device, full=False):
    """A query row holding NaN, +Inf or -Inf: no code is nearer than another, so its nearest are
    the first codes (0, 1, ...), at distance NaN (a NaN row) or inf, as on the torch path; the
    other rows are as without it. Top-1 (both kernels) and top-k, whole and split codebooks."""
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    for name in ("fp32_ieee", "bf16"):
        dt, prec, _ = DTYPES[name]
        x, c = _data((5, 6), dt, device), _data((40, 6), dt, device)
        x[1, 2], x[2, 0], x[3, 5] = float("nan"), float("inf"), float("-inf")
        for alg, split, k in itertools.product(("tiled", "auto"), (None, 3), (None, 3)):
            dist, idx = nearest_codes_triton(x, c, k=k, precision=prec, split_k=split, algorithm=alg)
            want_d, want_i = nearest_codes_triton(x[[0, 4]], c, k=k, precision=prec, split_k=split, algorithm=alg)
            first = torch.arange(k or 1, device=device).reshape(-1 if k else ())
            assert torch.equal(idx[[0, 4]], want_i) and torch.equal(dist[[0, 4]], want_d), (name, alg, split, k)
            assert all(torch.equal(idx[r], first) for r in (1, 2, 3)), (name, alg, split, k, idx)
            assert dist[1].isnan().all() and (dist[[2, 3]] == float("inf")).all(), (name, alg, split, k, dist)
        d_cos, i_cos = nearest_codes_triton(x, c, metric="cosine", precision=prec)
        assert d_cos[[1, 2, 3]].isnan().all() and (i_cos[[1, 2, 3]] == 0).all(), (name, d_cos, i_cos)


def check_bad_inputs(device, full=False):
    """What the search cannot take is named before any launch: top-k over a 1-D codebook, grouped
    inputs of no groups, float64 values past fp32's range (the cast to fp32 would make them inf)."""
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    x = _data((6, 3), torch.float32, device)
    far = torch.tensor([[-1e39, 0.0]], dtype=torch.float64, device=device)
    for call, words in ((lambda: nearest_codes_triton(x, x[0], k=2), "expected x (N, d) and codebook (K, d)"),
                        (lambda: nearest_codes_triton(x[None][:0], x[None][:0]), "at least one group"),
                        (lambda: nearest_codes_triton(far, x[:3, :2].double()), "beyond float32's range")):
        try:
            call()
        except ValueError as e:
            assert words in str(e), e
        else:
            raise AssertionError(f"no error naming {words!r}")


def check_launch_pieces(device, full=False):
    """Inputs past what one launch indexes in int32 (rows, splits' partial results, top-k outputs)
    or past the grid's group axis run in pieces of rows and groups: the same codes and distances
    as one launch, for the packed, tiled and top-k kernels (the limits lowered to reach them
    with small inputs). A column stride whose offsets would pass int32 makes a contiguous copy;
    a codebook past 2^30 codes is named; gradients never reach the search's inputs (a
    parameter as codebook), on either backend; a negative code count is named."""
    from tokenizers_vq.kernels import _host  # noqa: PLC0415
    from tokenizers_vq.kernels import nearest as nr  # noqa: PLC0415
    from tokenizers_vq.quantizers import code_statistics, nearest_codes  # noqa: PLC0415

    cases = [((41, 8), (300, 8), "bf16", None, "auto"), ((41, 24), (300, 24), "fp32_ieee", None, "tiled"),
             ((41, 8), (300, 8), "fp32_ieee", 3, "auto"), ((5, 33, 6), (5, 70, 6), "bf16", None, "auto"),
             ((5, 33, 6), (5, 70, 6), "fp16", 2, "tiled")]
    whole = []
    for xs, cs, name, k, alg in cases:
        dt, prec, _ = DTYPES[name]
        x, c = _data(xs, dt, device), _data(cs, dt, device)
        whole.append((x, c, prec, k, alg, nr.nearest_codes_triton(x, c, k=k, precision=prec, algorithm=alg, split_k=2)))
    rows, groups = nr._rows_per_launch, nr.MAX_GROUPS
    try:
        nr._rows_per_launch, nr.MAX_GROUPS = (lambda kk, topk: 10), 2
        nr._route.cache_clear()
        for x, c, prec, k, alg, (dist, idx) in whole:
            for write in (True, False):
                d2, i2 = nr.nearest_codes_triton(x, c, k=k, precision=prec, algorithm=alg, split_k=2, return_dist=write)
                assert torch.equal(i2, idx) and (not write or torch.equal(d2, dist)), (tuple(x.shape), alg, k)
    finally:
        nr._rows_per_launch, nr.MAX_GROUPS = rows, groups
        nr._route.cache_clear()
    assert nr._rows_per_launch(16384, 0) * 64 <= 2**31 - 1 < (nr._rows_per_launch(16384, 0) + 1) * 64 + 1024
    assert nr._rows_per_launch(10, 8) == (2**31 - 1025) // 8
    far = torch.empty_strided((4, 3), (1, 2**30), device="meta")  # columns 2^30 elements apart
    assert _host.int32_columns(far).stride() == (3, 1)
    near = torch.empty_strided((4, 3), (1, 2**29), device="meta")
    assert _host.int32_columns(near) is near
    try:
        nr._check_shapes(torch.Size([4, 3]), torch.Size([2**30 + 1, 3]), x.device, x.device, "l2", "tf32", "auto")
    except ValueError as e:
        assert "[1, 2^30]" in str(e), e
    else:
        raise AssertionError("a codebook past 2^30 codes was taken")
    x, c = _data((9, 4), torch.float32, device), torch.nn.Parameter(_data((20, 4), torch.float32, device))
    for backend in ("torch", "triton"):
        dist, idx = nearest_codes(x.requires_grad_(), c, backend=backend)
        assert not dist.requires_grad, backend
    try:
        code_statistics(x.detach(), idx, -1)
    except ValueError as e:
        assert "number of codes" in str(e), e
    else:
        raise AssertionError("a negative number of codes was taken")


def check_custom_op(device, full=False):
    """The registered op passes torch's opcheck (schema, fake tensor, dispatch)."""
    import tokenizers_vq.kernels.nearest  # noqa: F401, PLC0415  (registers the ops, in a process of its own too)

    for args in ((_data((9, 6), torch.float32, device), _data((33, 6), torch.float32, device), "l2", 0, "ieee", True, 0),
                 (_data((2, 5, 3), torch.float32, device), _data((2, 8, 3), torch.float32, device), "cosine", 2, "ieee", False, 0),
                 (_data((9, 6), torch.bfloat16, device), _data((33, 6), torch.bfloat16, device), "l2", 0, "tf32", True, 0,
                  "packed")):
        torch.library.opcheck(torch.ops.tokenizers_vq.nearest_codes.default, args)
    x = _data((20, 4), torch.float32, device)
    torch.library.opcheck(torch.ops.tokenizers_vq.code_statistics.default, (x, torch.randint(0, 6, (20,), device=device), 6))


def check_ema_update(device, full=False):
    """The fused EMA update gives the torch update's statistics, codebook, restarted rows
    (the same spread_rows draw), restart count and metrics: l2 and cosine, with and without
    restarts, codes in several blocks (and more blocks than one pass of the partial sums takes),
    rows wider than a column block; a step whose sums hold NaN or Inf changes nothing."""
    import copy  # noqa: PLC0415

    from tokenizers_vq.kernels.ema import METRICS, ema_update_triton  # noqa: PLC0415
    from tokenizers_vq.quantizers import VectorQuantizer  # noqa: PLC0415

    shapes = [(40, 7, 300), (100, 130, 50), (5, 3, 2), (2100, 3, 900)] + ([(20000, 8, 4096)] if full else [])
    for (k, d, n), metric, restart, poison in itertools.product(shapes, ("l2", "cosine"), (True, False), (False, True)):
        if poison and (k, restart) != (40, True):
            continue
        vq = VectorQuantizer(d, k, metric=metric, dead_code_threshold=0.7, restart_dead_codes=restart).to(device).train()
        vq.cluster_size.uniform_(0, 2)
        x = _data((n, d), torch.float32, device)
        x = torch.nn.functional.normalize(x, dim=-1) if metric == "cosine" else x
        idx = torch.randint(0, k, (n,), device=device)
        counts = torch.zeros(k, device=device).index_add_(0, idx, torch.ones(n, device=device))
        sums = torch.zeros(k, d, device=device).index_add_(0, idx, x)
        if poison:
            sums[3, 1] = float("nan") if metric == "l2" else float("inf")
        ref = copy.deepcopy(vq)
        torch.manual_seed(k)
        want = ref._metrics(counts)
        ref._update(x, counts, sums, want)
        torch.manual_seed(k)
        got = ema_update_triton(counts, sums, vq.cluster_size, vq.embed_sum, vq.embed, vq.restarts, x, decay=vq.decay,
                                eps=vq.eps, threshold=0.7, restart=restart, cosine=metric == "cosine")
        case = (k, d, n, metric, restart, poison)
        assert list(want) == list(METRICS[: len(want)]), (case, list(want))
        for name, value in zip(METRICS, got):
            if name in want:
                torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-5, msg=lambda m, c=case, v=name: f"{c} {v}: {m}")
        assert torch.equal(vq.restarts, ref.restarts) and (not poison or float(got[4]) == 1.0), case
        assert float(ref.restarts) > 0 or not restart or poison, ("no restart exercised", case)
        for name in ("cluster_size", "embed_sum", "embed"):
            torch.testing.assert_close(getattr(vq, name), getattr(ref, name), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, c=case, b=name: f"{c} {b}: {m}")
    from tokenizers_vq.kernels import ema  # noqa: PLC0415
    from tokenizers_vq.quantizers._fused import fused_update  # noqa: PLC0415

    with mock.patch.object(ema, "MAX_CODES", 39):  # past it: refused, and the quantizer keeps the torch update
        try:
            ema_update_triton(counts, sums, vq.cluster_size, vq.embed_sum, vq.embed, vq.restarts, x, decay=0.9, eps=1e-5,
                              threshold=0.7, restart=True, cosine=False)
        except ValueError as e:
            assert "at most 39 codes" in str(e), e
        else:
            raise AssertionError("a codebook past MAX_CODES was taken")
        vq = VectorQuantizer(d, 40, backend="triton").to(device).train()
        assert fused_update(vq, x, counts[:40], sums[:40]) is None


def check_fused_training_step(device, full=False):
    """The fused straight-through output and commitment loss equal the torch ones in value and
    in the gradient they give the rows (both used, either alone, strided rows, NaN and Inf in the
    rows); the output may be changed in place, a second derivative is the torch one; a VectorQuantizer
    training on the fused kernels (l2 and cosine, restarts on) runs them and gives the codes,
    output, losses, gradients, metrics and updated codebook of the torch version at every step,
    and autograd refuses a graph that saved the codebook the update rewrote, as on the torch path."""
    import collections  # noqa: PLC0415
    import copy  # noqa: PLC0415

    from tokenizers_vq.kernels.commit import commit_ste_triton  # noqa: PLC0415
    from tokenizers_vq.quantizers import VectorQuantizer, _fused  # noqa: PLC0415

    for n, d, k in ((70, 5, 9), (3, 200, 4)) + (((40000, 256, 1024),) if full else ()):
        c = _data((k, d), torch.float32, device)
        idx = torch.randint(0, k, (n,), device=device)
        g = _data((n, d), torch.float32, device)
        for use, strided in itertools.product(("both", "q", "loss"), (False, True)):
            base = _data((d, n), torch.float32, device).t() if strided else _data((n, d), torch.float32, device)
            x1, x2 = base.clone().requires_grad_(), base.clone().requires_grad_()
            q, loss = commit_ste_triton(x1, c, idx, 0.3)
            q_ref = c[idx].detach() + (x2 - x2.detach())
            loss_ref = 0.3 * torch.nn.functional.mse_loss(x2, c[idx])
            assert torch.equal(q, q_ref), (n, d, use)
            torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
            total = {"both": (q * g).sum() + 5 * loss, "q": (q * g).sum(), "loss": 5 * loss}[use]
            total_ref = {"both": (q_ref * g).sum() + 5 * loss_ref, "q": (q_ref * g).sum(), "loss": 5 * loss_ref}[use]
            total.backward()
            total_ref.backward()
            torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7, msg=lambda m, c=(n, d, use): f"{c}: {m}")
    x, c = _data((4, 3), torch.float32, device), _data((2, 3), torch.float32, device)
    x[2, 1], x[0, 0] = float("nan"), float("inf")
    x.requires_grad_()
    q, loss = commit_ste_triton(x, c, torch.zeros(4, dtype=torch.long, device=device), 0.25)
    torch.testing.assert_close(q, c[0] + (x - x), equal_nan=True)  # as the torch sum: NaN where x is not finite
    assert q.isnan().sum() == 2, q
    q.sum().backward()  # the loss unused: the straight-through gradient alone, finite everywhere
    assert torch.equal(x.grad, torch.ones_like(x)), x.grad
    x = _data((5, 3), torch.float32, device).requires_grad_()
    q, loss = commit_ste_triton(x, c, torch.ones(5, dtype=torch.long, device=device), 0.25)
    q += 1.0  # the output is the caller's to change
    (q.sum() + loss).backward()
    torch.testing.assert_close(x.grad, 1 + 0.5 * (x - c[1]).detach() / x.numel())
    w, second = _data((5, 3), torch.float32, device), []
    for fn in (lambda t: commit_ste_triton(t, c, torch.ones(5, dtype=torch.long, device=device), 0.25),
               lambda t: (c[1] + (t - t.detach()), 0.25 * torch.nn.functional.mse_loss(t, c[1].expand(5, 3)))):
        x.grad = None
        q, loss = fn(x)
        (gx,) = torch.autograd.grad((q * w).sum() + loss, x, create_graph=True)  # a second derivative, through both
        (gx * w).sum().backward()
        second.append(x.grad)
    torch.testing.assert_close(second[0], second[1])
    torch.testing.assert_close(second[0], 0.5 * w / x.numel())
    p = torch.nn.Parameter(x.detach().clone())  # a tensor subclass: the custom ops' path, eager
    q, loss = commit_ste_triton(p, c, torch.ones(5, dtype=torch.long, device=device), 0.25)
    (gp,) = torch.autograd.grad((q * w).sum() + loss, p, create_graph=True)
    torch.testing.assert_close(gp, w + 0.5 * (p - c[1]).detach() / p.numel())
    (gp * w).sum().backward()
    torch.testing.assert_close(p.grad, second[0])
    ran = collections.Counter()

    def spy(op, name):
        def call(*args, **kwargs):
            ran[name] += 1
            return op(*args, **kwargs)
        return call

    for metric in ("l2", "cosine"):
        torch.manual_seed(0)
        fused = VectorQuantizer(8, 300, metric=metric, backend="triton", kmeans_init=True, dead_code_threshold=0.5)
        fused = fused.to(device).train()
        plain = copy.deepcopy(fused)
        for step in range(4):
            z = _data((6, 40, 8), torch.float32, device)
            z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
            fused.load_state_dict(plain.state_dict())  # each step from one state (a tf32 search may round the two apart)
            torch.manual_seed(step)
            with mock.patch.object(_fused, "_triton_op", side_effect=lambda name, real=_fused._triton_op: spy(real(name), name)):
                a = fused(z1)
            assert ran == {"commit_ste_triton": 1, "ema_update_triton": 1}, ran
            ran.clear()
            torch.manual_seed(step)
            with mock.patch("tokenizers_vq.quantizers.vq.fused_update", return_value=None), \
                    mock.patch("tokenizers_vq.quantizers.vq.fused_commit", return_value=None):  # the torch version
                b = plain(z2)
            assert torch.equal(a.codes, b.codes) and list(a.metrics) == list(b.metrics), (metric, step)
            assert torch.equal(a.quantized, b.quantized), (metric, step)
            (a.quantized.square().mean() + sum(a.losses.values())).backward()
            (b.quantized.square().mean() + sum(b.losses.values())).backward()
            torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-8)
            for name in b.metrics:
                torch.testing.assert_close(a.metrics[name], b.metrics[name], rtol=1e-5, atol=1e-5)
            for name in b.losses:
                torch.testing.assert_close(a.losses[name], b.losses[name], rtol=1e-5, atol=1e-7)
            for name in ("cluster_size", "embed_sum", "embed", "restarts"):
                torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=1e-5, atol=1e-5)
        assert float(plain.restarts) > 0, ("no restart in the module steps", metric)
    for enabled in (True, False):  # a graph that saved the codebook, which the step's update rewrites in place
        vq = VectorQuantizer(8, 50, backend="triton").to(device).train()
        z = _data((4, 30, 8), torch.float32, device).requires_grad_()
        aux = (z @ vq.codebook.T).logsumexp(-1).mean()
        with mock.patch.object(_fused, "ENABLED", enabled):
            out = vq(z)
        try:
            (aux + out.quantized.mean()).backward()
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e), e
        else:
            raise AssertionError(f"a stale saved codebook went unnoticed (fused: {enabled})")
    _check_compiled_fused_step(device)


def _check_compiled_fused_step(device):
    """Under ``torch.compile(fullgraph=True)`` the training step keeps the fused kernels (custom ops;
    inductor on the GPU, AOTAutograd's eager graphs in the interpreter) and gives the eager step's codes,
    output, gradients, metrics and codebook, restarts included."""
    import copy  # noqa: PLC0415

    from tokenizers_vq.kernels import commit, ema  # noqa: PLC0415
    from tokenizers_vq.quantizers import VectorQuantizer  # noqa: PLC0415

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = VectorQuantizer(8, 300, backend="triton", kmeans_init=True, dead_code_threshold=0.5).to(device).train()
    eager(_data((6, 40, 8), torch.float32, device))  # the k-means start, eager
    traced = copy.deepcopy(eager)

    def step(vq, z):
        out = vq(z)
        return out, out.quantized.square().mean() + sum(out.losses.values())

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    ran = {name: 0 for name in ("_forward", "_backward", "_update")}

    def spy(module, name):
        real = getattr(module, name)

        def call(*args):
            ran[name] += 1
            return real(*args)
        return mock.patch.object(module, name, call)

    for i in range(3):
        z = _data((6, 40, 8), torch.float32, device)
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        torch.manual_seed(i)
        a, loss_a = step(eager, z1)
        loss_a.backward()
        torch.manual_seed(i)
        with spy(commit, "_forward"), spy(commit, "_backward"), spy(ema, "_update"):
            b, loss_b = compiled(traced, z2)
            loss_b.backward()
        assert ran == {"_forward": i + 1, "_backward": i + 1, "_update": i + 1}, ("compiled step left the kernels", ran)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.quantized, b.quantized), i
        torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-6, atol=1e-9)
        for name in a.metrics:
            torch.testing.assert_close(a.metrics[name], b.metrics[name], rtol=1e-6, atol=1e-6)
        for name in ("cluster_size", "embed_sum", "embed", "restarts"):
            torch.testing.assert_close(getattr(eager, name), getattr(traced, name), rtol=1e-6, atol=1e-6)
    assert float(traced.restarts) > 0, "no restart in the compiled steps"
    from torch._dynamo.utils import counters  # noqa: PLC0415

    counters.clear()
    for n in (37, 41, 53, 60):  # other batch sizes: one more graph with a symbolic size, not one per size
        compiled(traced, _data((n, 8), torch.float32, device).requires_grad_())[1].backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


GROUPS = {f.__name__: f for f in (check_odd_shapes, check_ties_and_splits, check_topk, check_topk_exact, check_grouped_and_layouts,
                                  check_packed_odd_shapes, check_packed_ties_splits_groups, check_packed_half,
                                  check_row_reduce, check_repeated_calls,
                                  check_code_statistics, check_ema_update, check_fused_training_step,
                                  check_nonfinite_rows, check_bad_inputs,
                                  check_launch_pieces, check_custom_op)}


# -- CPU: the groups in two interpreter subprocesses at once ------------------------------
@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the shared check modules
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    names = list(GROUPS)
    procs = [subprocess.Popen([sys.executable, __file__, *names[i::2]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]  # about half the time each
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"interpreter run produced no results:\n{out[-3000:]}\n{err[-3000:]}"
        results.update(json.loads(lines[-1]))
    return results


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
    for name, algorithm in itertools.product(("bf16", "fp32_tf32"), ("tiled", "packed")):  # packed: autotuned, split cap
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_training_step():
    """``torch.cuda.make_graphed_callables`` takes a VectorQuantizer whole (its output is a pytree): the
    replayed training steps (search, fused EMA update, backward) give the eager steps' codes, gradients
    and codebook; with restarts, codes are restarted inside the replays."""
    import copy  # noqa: PLC0415

    from tokenizers_vq.quantizers import VectorQuantizer  # noqa: PLC0415

    torch.manual_seed(0)
    q = VectorQuantizer(32, 512, restart_dead_codes=False, check_finite=False).cuda().train()
    z0 = _data((8, 64, 32), torch.float32, "cuda").requires_grad_()
    q(z0)  # the k-means start, eagerly (its flag is on the host)
    ref = copy.deepcopy(q)
    graphed = torch.cuda.make_graphed_callables(q, (z0,))  # three warm-up steps on z0, then the capture
    for _ in range(3):
        ref(z0)
    torch.testing.assert_close(q.embed, ref.embed)
    one = torch.ones((), device="cuda")
    for _ in range(3):
        z = _data((8, 64, 32), torch.float32, "cuda").requires_grad_()
        zr = z.detach().clone().requires_grad_()
        out, r = graphed(z), ref(zr)
        g = torch.randn_like(r.quantized)
        torch.autograd.backward([out.quantized, out.losses["commitment"]], [g, one])
        torch.autograd.backward([r.quantized, r.losses["commitment"]], [g, one])
        assert torch.equal(out.codes, r.codes)
        torch.testing.assert_close(z.grad, zr.grad)
        torch.testing.assert_close(out.metrics["perplexity"], r.metrics["perplexity"])
    torch.testing.assert_close(q.embed, ref.embed)
    torch.testing.assert_close(q.cluster_size, ref.cluster_size)

    q = VectorQuantizer(32, 512, dead_code_threshold=1e9, check_finite=False).cuda().train()
    q(z0)
    graphed = torch.cuda.make_graphed_callables(q, (z0,))
    q.cluster_size.zero_()  # every code under the threshold again (a restart leaves its count at twice it)
    before = int(q.restarts)
    rows = _data((8, 64, 32), torch.float32, "cuda").requires_grad_()
    graphed(rows).quantized.sum().backward()
    assert int(q.restarts) == before + 512
    assert (q.embed[:, None] == rows.detach().reshape(-1, 32)[None]).all(-1).any(1).all()  # onto this batch's rows
    with pytest.raises(ValueError, match="check_finite=False"):  # its check waits for the GPU: named, not a capture error
        torch.cuda.make_graphed_callables(VectorQuantizer(32, 512).cuda().train(), (z0,))


def test_triton_calls_on_cpu_tensors_are_named():
    """Outside the interpreter the Triton functions take CUDA tensors; CPU ones are refused naming
    the torch functions that take them (a bare AssertionError from the CUDA runtime otherwise)."""
    pytest.importorskip("triton")
    code = ("import torch\n"
            "from tokenizers_vq.kernels.nearest import code_statistics_triton, nearest_codes_triton\n"
            "x = torch.randn(5, 3)\n"
            "for call, name in ((lambda: nearest_codes_triton(x, x), 'nearest_codes'),\n"
            "                   (lambda: code_statistics_triton(x, torch.zeros(5, dtype=torch.long), 2), 'code_statistics')):\n"
            "    try:\n"
            "        call()\n"
            "    except ValueError as e:\n"
            "        assert 'TRITON_INTERPRET=1' in str(e) and 'the input is on cpu' in str(e), e\n"
            "        assert 'use tokenizers_vq.quantizers.' + name in str(e), e\n"
            "    else:\n"
            "        raise AssertionError(name)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def test_import_does_not_load_triton():
    code = "import sys, tokenizers_vq, tokenizers_vq.quantizers; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


if __name__ == "__main__":  # the groups named as arguments (all by default) in the Triton interpreter
    out = {}
    for name in sys.argv[1:] or GROUPS:
        try:
            GROUPS[name]("cpu")
            out[name] = "ok"
        except Exception:  # noqa: BLE001  (reported to the parent test)
            out[name] = traceback.format_exc()
    print(json.dumps(out))
