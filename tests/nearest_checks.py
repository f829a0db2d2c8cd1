"""Shared pieces of the nearest-code search tests: an fp64 reference, the rounding bound
of the search arithmetic, fresh data and poisoned outputs (``tests/kernels/test_nearest.py``
and ``tests/packed_checks.py``).

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


def _check_search(x, c, metric, dtype_name, k=None, split_k=None, dist_out=True, algorithm="tiled", plan=None):
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415
    from tokenizers_vq.kernels.plan import DEFAULT_PLAN  # noqa: PLC0415

    _, precision, u_in = DTYPES[dtype_name]
    with poisoned_outputs():
        dist, idx = nearest_codes_triton(x, c, metric=metric, k=k, precision=precision, split_k=split_k,
                                         return_dist=dist_out, algorithm=algorithm, plan=plan)
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
    # the packed kernel (algorithm "packed", or "auto" where it applies) drops TILE_BITS of each key's mantissa
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415

    groups = x.shape[0] if x.ndim == 3 else 1
    packed = algorithm != "tiled" and k is None and packed_launch.applies(
        torch.promote_types(x.dtype, c.dtype), x.shape[-1], metric, precision, groups, ncode, plan or DEFAULT_PLAN)
    tol_idx = tol + 2 * 2.0 ** -(23 - (plan or DEFAULT_PLAN).tile_bits) * (kth + tol) if packed else tol
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
