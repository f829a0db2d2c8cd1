"""The EMA codebook's end of a training step in two Triton launches.

After the search and the per-code statistics, a VQ-EMA step updates the ``(K,)`` EMA counts
and ``(K, d)`` EMA sums, rebuilds the Laplace-smoothed codebook from them, restarts dead codes
from rows of the batch and reports four usage metrics: in torch, about 55 small operations,
each a launch and its host time. Here the first launch writes, per block of codes, the partial
sums everything global needs (the counts and their entropy terms, the non-finite sums, the new
EMA counts, the dead codes); the second reduces them in a fixed order (every program the same
way: no atomics, bitwise reproducible) and writes the new statistics and codebook rows, and
from its first program the metrics.

The result is :meth:`tokenizers_vq.VectorQuantizer._update` (with ``_restart`` and
``_metrics``) on one process: the same restarted rows from the same draw (``spread_rows``),
the same codes found dead (``torch.lerp``'s formula), sums of the counts within fp32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenizers_vq.kernels import _compat  # noqa: F401  (interpreter fix, before any launch)
from tokenizers_vq.kernels import relaunch
from tokenizers_vq.kernels._host import cdiv, golden_stride, int32_columns, next_pow2, plain_eager

METRICS = ("perplexity", "usage_batch", "usage_window", "dead_codes", "skipped", "restarted")
"""The names of :func:`ema_update_triton`'s metrics, in its output's order."""

MAX_CODES = 1 << 17
"""The largest codebook this update takes: every program reduces all blocks' partial sums, which
grows with the square of the blocks (past it the torch version is as fast)."""

_PARTS = 8  # partial sums per block of codes (see _ema_partials_kernel)


@triton.jit
def _lerp(a, b, w):
    """``torch.lerp(a, b, w)`` for a scalar weight, in its two-sided form."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))


@triton.jit
def _pick(v, cols, i: tl.constexpr):
    return tl.sum(tl.where(cols == i, v, 0.0), axis=0)


@triton.jit
def _ema_partials_kernel(COUNTS, SUMS, CS, PART, K, D, w, threshold,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(K, BLOCK_K),)``: ``PART[p, :]`` for block ``p`` of codes = (sum of counts,
    sum of ``c log c``, codes seen, codes dead before the update, non-finite sums, sum of the
    updated EMA counts, sum of the current ones, codes dead after the update)."""
    pid = tl.program_id(0)
    kk = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    km = kk < K
    c = tl.load(COUNTS + kk, mask=km, other=0.0)
    cs = tl.load(CS + kk, mask=km, other=0.0)
    new = _lerp(cs, c, w)
    bad = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        s = tl.load(SUMS + kk.to(tl.int64)[:, None] * D + dd[None, :], mask=km[:, None] & (dd < D)[None, :], other=0.0)
        bad += tl.where((s == s) & (tl.abs(s) < float("inf")), 0.0, 1.0)
    row = PART + pid * 8
    tl.store(row + 0, tl.sum(c, axis=0))
    tl.store(row + 1, tl.sum(tl.where(c > 0, c * tl.log(tl.where(c > 0, c, 1.0)), 0.0), axis=0))
    tl.store(row + 2, tl.sum((c > 0).to(tl.float32), axis=0))
    tl.store(row + 3, tl.sum((km & (cs < threshold)).to(tl.float32), axis=0))
    tl.store(row + 4, tl.sum(tl.sum(bad, axis=1), axis=0))
    tl.store(row + 5, tl.sum(tl.where(km, new, 0.0), axis=0))
    tl.store(row + 6, tl.sum(cs, axis=0))
    tl.store(row + 7, tl.sum((km & (new < threshold)).to(tl.float32), axis=0))


@triton.jit(do_not_specialize=["STRIDE"])
def _ema_apply_kernel(COUNTS, SUMS, CS, ES, EMBED, X, OFFSET, PART, METRICS, RESTARTS,
                      K, D, N, STRIDE, P, sxn, sxd, w, eps, keps, threshold, reset,
                      RESTART: tl.constexpr, COSINE: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Grid ``(cdiv(K, BLOCK_K),)``: the update of block ``pid`` of codes from every block's
    partial sums (reduced in the same order in every program) and, in program 0, the metrics."""
    pid = tl.program_id(0)
    cols = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_P, 8], dtype=tl.float32)
    dead_before = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        v = tl.load(PART + pp[:, None] * 8 + cols[None, :], mask=(pp < P)[:, None], other=0.0)
        acc += v
        dead_before += tl.load(PART + pp * 8 + 7, mask=pp < pid, other=0.0)
    tot = tl.sum(acc, axis=0)
    ok = _pick(tot, cols, 4) == 0
    n = tl.where(ok, _pick(tot, cols, 5), _pick(tot, cols, 6))

    kk = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    km = kk < K
    old = tl.load(CS + kk, mask=km, other=0.0)
    cs = tl.where(ok, _lerp(old, tl.load(COUNTS + kk, mask=km, other=0.0), w), old)
    smoothed = (cs + eps) / (n + keps) * n
    dead = tl.where(ok, km & (cs < threshold), kk < 0)
    if not RESTART:
        dead = kk < 0
    slot = tl.sum(dead_before, axis=0).to(tl.int64) + tl.cumsum(dead.to(tl.int64), axis=0) - 1
    src = (tl.load(OFFSET) + (slot % N) * STRIDE) % N  # the rows of tokenizers_vq.distributed.spread_rows
    rows = kk.to(tl.int64)[:, None] * D
    scale = tl.full([BLOCK_K], 1.0, dtype=tl.float32)
    if COSINE:  # the rows' norms first: the new codewords are l2-normalised (F.normalize, eps 1e-12)
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = km[:, None] & (dd < D)[None, :]
            es = _lerp(tl.load(ES + rows + dd[None, :], mask=m, other=0.0),
                       tl.load(SUMS + rows + dd[None, :], mask=m, other=0.0), w)
            e = es / smoothed[:, None]
            sq += tl.sum(e * e, axis=1)
        scale = tl.maximum(tl.sqrt(sq), 1e-12)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = km[:, None] & (dd < D)[None, :]
        es_old = tl.load(ES + rows + dd[None, :], mask=m, other=0.0)
        es = tl.where(ok, _lerp(es_old, tl.load(SUMS + rows + dd[None, :], mask=m, other=0.0), w), es_old)
        e = tl.where(ok, es / smoothed[:, None] / scale[:, None], tl.load(EMBED + rows + dd[None, :], mask=m, other=0.0))
        if RESTART:
            fresh = tl.load(X + src[:, None] * sxn + dd[None, :] * sxd, mask=dead[:, None] & (dd < D)[None, :], other=0.0)
            es = tl.where(dead[:, None], fresh * reset, es)
            e = tl.where(dead[:, None], fresh, e)
        tl.store(ES + rows + dd[None, :], es, mask=m)
        tl.store(EMBED + rows + dd[None, :], e, mask=m)
    tl.store(CS + kk, tl.where(dead, reset, cs), mask=km)
    if pid == 0:
        seen = _pick(tot, cols, 0)
        floor = tl.maximum(seen, 1e-10)  # perplexity(counts): exp(-sum p log p), p = c / max(sum c, 1e-10)
        entropy = tl.maximum(seen / floor * tl.log(floor) - _pick(tot, cols, 1) / floor, 0.0)  # (>= 0 as a sum)
        restarted = tl.where(ok & RESTART, _pick(tot, cols, 7), 0.0)
        out = tl.where(cols == 0, tl.exp(entropy), 0.0)
        out = tl.where(cols == 1, _pick(tot, cols, 2) / K, out)
        out = tl.where(cols == 2, 1.0 - _pick(tot, cols, 3) / K, out)
        out = tl.where(cols == 3, _pick(tot, cols, 3), out)
        out = tl.where(cols == 4, 1.0 - ok.to(tl.float32), out)
        out = tl.where(cols == 5, restarted, out)
        tl.store(METRICS + cols, out, mask=cols < 6)
        if RESTART:
            tl.store(RESTARTS, tl.load(RESTARTS) + restarted.to(tl.int64))


def ema_update_triton(counts: Tensor, sums: Tensor, cluster_size: Tensor, embed_sum: Tensor, embed: Tensor,
                      restarts: Tensor, x: Tensor, *, decay: float, eps: float, threshold: float,
                      restart: bool, cosine: bool) -> Tensor:
    """One step's EMA update of a VQ codebook, in place, and its usage metrics.

    The statistics follow ``lerp(old, new, 1 - decay)`` unless ``sums`` holds Inf or NaN (then
    nothing changes and the step counts as skipped); the codebook becomes ``embed_sum`` over
    the Laplace-smoothed counts (l2-normalised with ``cosine``); with ``restart``, each code
    whose new count is under ``threshold`` takes a row of ``x`` (distinct rows while there
    are enough, in the order :func:`tokenizers_vq.distributed.spread_rows` gives), as its codeword, ``reset`` times it
    as its sum, and ``reset = 2 * threshold`` as its count, and ``restarts`` counts them.

    Args:
        counts: ``(K,)`` fp32 assignments of this step, ``K <= MAX_CODES``.
        sums: ``(K, d)`` fp32 sums of the rows assigned to each code.
        cluster_size, embed_sum, embed: the EMA counts ``(K,)``, sums and codebook ``(K, d)``,
            fp32 and contiguous; updated in place.
        restarts: int64 scalar, the running number of restarts; updated in place.
        x: ``(N, d)`` fp32 rows of this step, ``N >= 1`` (the restarts' source).
        decay, eps, threshold: the EMA decay, the Laplace smoothing and the dead-code threshold.
        restart: whether dead codes are restarted.
        cosine: whether the codebook rows are l2-normalised.

    Returns:
        ``(6,)`` fp32: the metrics named in :data:`METRICS` (perplexity and usage of this step's
        counts, the window's usage and dead codes before the update, whether the step was
        skipped, the codes restarted).
    """
    relaunch.check_device(x, "ema_update_triton", "use VectorQuantizer's torch update there")
    k, d = embed.shape
    n = x.shape[0]
    for name, t, shape in (("counts", counts, (k,)), ("sums", sums, (k, d)), ("cluster_size", cluster_size, (k,)),
                           ("embed_sum", embed_sum, (k, d)), ("x", x, (n, d))):
        if t.shape != shape or t.dtype != torch.float32 or (name != "x" and not t.is_contiguous()):
            raise ValueError(f"ema_update_triton: {name} must be fp32 {'' if name == 'x' else 'contiguous '}of shape "
                             f"{shape}, got {t.dtype} {tuple(t.shape)}")
    if not (embed.dtype == torch.float32 and embed.is_contiguous() and restarts.dtype == torch.int64 and n >= 1):
        raise ValueError("ema_update_triton: embed must be contiguous fp32, restarts an int64 scalar, and x hold rows")
    if k > MAX_CODES:
        raise ValueError(f"ema_update_triton takes at most {MAX_CODES} codes, got {k}: use the torch update")
    if plain_eager(counts, sums, cluster_size, embed_sum, embed, restarts, x):
        return _update(counts, sums, cluster_size, embed_sum, embed, restarts, x, decay, eps, threshold, restart, cosine)
    return _ema_op(counts, sums, cluster_size, embed_sum, embed, restarts, x, decay, eps, threshold, restart, cosine)


def _update(counts: Tensor, sums: Tensor, cluster_size: Tensor, embed_sum: Tensor, embed: Tensor, restarts: Tensor,
            x: Tensor, decay: float, eps: float, threshold: float, restart: bool, cosine: bool) -> Tensor:
    k, d = embed.shape
    n = x.shape[0]
    offset = torch.randint(n, (1,), device=x.device) if restart else restarts  # (a placeholder without restarts)
    x = int32_columns(x)
    block_k = 32 if k <= 8192 else 64 if k <= 65536 else 128
    block_d = min(64, next_pow2(d))
    parts = cdiv(k, block_k)
    part = torch.empty(parts, _PARTS, device=x.device, dtype=torch.float32)
    metrics = torch.empty(len(METRICS), device=x.device, dtype=torch.float32)
    w = 1.0 - decay
    relaunch.launch(_ema_partials_kernel, (parts,), counts, sums, cluster_size, part, k, d, w, threshold,
                    BLOCK_K=block_k, BLOCK_D=block_d)
    relaunch.launch(_ema_apply_kernel, (parts,), counts, sums, cluster_size, embed_sum, embed, x, offset, part,
                    metrics, restarts, k, d, n, golden_stride(n), parts, *x.stride(), w, eps, k * eps, threshold,
                    2.0 * threshold,
                    RESTART=restart, COSINE=cosine, BLOCK_K=block_k, BLOCK_D=block_d,
                    BLOCK_P=min(64, next_pow2(parts)))
    return metrics


@torch.library.custom_op("tokenizers_vq::ema_update", mutates_args=("cluster_size", "embed_sum", "embed", "restarts"))
def _ema_op(counts: Tensor, sums: Tensor, cluster_size: Tensor, embed_sum: Tensor, embed: Tensor, restarts: Tensor,
            x: Tensor, decay: float, eps: float, threshold: float, restart: bool, cosine: bool) -> Tensor:
    """:func:`ema_update_triton` for ``torch.compile``, which sees which buffers it writes."""
    return _update(counts, sums, cluster_size, embed_sum, embed, restarts, x, decay, eps, threshold, restart, cosine)


@_ema_op.register_fake
def _(counts, sums, cluster_size, embed_sum, embed, restarts, x, decay, eps, threshold, restart, cosine):
    return counts.new_empty(len(METRICS), dtype=torch.float32)
