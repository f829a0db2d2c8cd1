"""Nearest-codeword search on the GPU: the public call, its checks, the choice between
the packed kernel (:mod:`.packed`, the default where it applies) and the tiled kernel
(:mod:`.tiled`), top-k (:mod:`.topk`), and the ``torch.library`` custom op that
``torch.compile`` and CUDA graphs see. Shared pieces are in :mod:`.tiles`, the tuning
choices in :mod:`.plan`."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tokenizers_vq.kernels import packed_launch, relaunch
from tokenizers_vq.kernels._host import INT32_MAX, cdiv, check_fp32_range, int32_columns, plain_eager
from tokenizers_vq.kernels.commit import commit_ste_triton  # noqa: F401  (re-exported)
from tokenizers_vq.kernels.ema import ema_update_triton  # noqa: F401  (re-exported)
from tokenizers_vq.kernels.plan import DEFAULT_PLAN, SearchPlan
from tokenizers_vq.kernels.segment import code_statistics_triton  # noqa: F401  (re-exported)
from tokenizers_vq.kernels.tiled import nearest_tiled
from tokenizers_vq.kernels.tiles import SPLIT_QUANTUM
from tokenizers_vq.kernels.topk import nearest_topk

PRECISIONS = ("tf32", "tf32x3", "ieee")
ALGORITHMS = ("auto", "tiled", "packed")  # top-1 search: "auto" = "packed" where it applies, else the tiled kernel


def _check_shapes(x_shape: torch.Size, c_shape: torch.Size, x_device: torch.device, c_device: torch.device,
                  metric: str, precision: str, algorithm: str) -> None:
    if len(x_shape) not in (2, 3) or len(c_shape) != len(x_shape) or x_shape[-1] != c_shape[-1]:
        raise ValueError(f"expected x (N, d) and codebook (K, d), or (G, N, d) and (G, K, d); "
                         f"got {tuple(x_shape)} and {tuple(c_shape)}")
    if len(x_shape) == 3 and x_shape[0] != c_shape[0]:
        raise ValueError(f"x has {x_shape[0]} groups but codebook has {c_shape[0]}")
    if len(x_shape) == 3 and x_shape[0] < 1:
        raise ValueError(f"grouped inputs need at least one group; got x {tuple(x_shape)}")
    if c_shape[-2] < 1 or c_shape[-2] > 2**30:
        raise ValueError(f"codebook size must be in [1, 2^30], got {c_shape[-2]}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"unknown metric {metric!r}; expected 'l2' or 'cosine'")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    if x_device != c_device:
        raise ValueError(f"x on {x_device} but codebook on {c_device}")


MAX_GROUPS = 65535
"""Most codebooks one launch searches: groups sit on a launch grid's y or z axis."""


def _rows_per_launch(k: int, topk: int) -> int:
    """Most rows one launch takes: the kernels index rows, the partial results of codebook
    splits (``S N k`` per group, ``S <= K / SPLIT_QUANTUM``) and top-k outputs (``N k``) in int32."""
    return (INT32_MAX - 1024) // (max(cdiv(k, SPLIT_QUANTUM), 1) * max(topk, 1))


@functools.lru_cache(maxsize=1024)
def _route(x_shape: torch.Size, c_shape: torch.Size, x_dtype: torch.dtype, c_dtype: torch.dtype,
           x_device: torch.device, c_device: torch.device, metric: str, k: int, precision: str,
           algorithm: str, plan: SearchPlan) -> tuple[torch.dtype, str, int]:
    """``(dtype, kernel, rows)`` of a call: the common float dtype of x and the codebook (bf16, fp16
    or fp32; anything else goes to fp32), which kernel runs ("packed", "tiled", "topk") and the
    most rows one launch takes (:func:`_rows_per_launch`).
    Cached per shapes, dtypes and options, after :func:`_check_shapes` passed for them (a failing
    check raises and is not cached)."""
    _check_shapes(x_shape, c_shape, x_device, c_device, metric, precision, algorithm)
    dt = torch.promote_types(x_dtype, c_dtype)
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        dt = torch.float32
    g, kk = (c_shape[0], c_shape[1]) if len(c_shape) == 3 else (1, c_shape[0])
    rows = _rows_per_launch(kk, k)
    if k:
        return dt, "topk", rows
    if algorithm != "tiled" and packed_launch.applies(dt, x_shape[-1], metric, precision, g, kk, plan=plan):
        return dt, "packed", rows
    return dt, "tiled", rows


def _nearest_impl(x: Tensor, codebook: Tensor, metric: str, k: int, precision: str, return_dist: bool,
                  split_k: int, algorithm: str = "auto", plan: SearchPlan = DEFAULT_PLAN) -> tuple[Tensor, Tensor]:
    dt, kernel, rows = _route(x.shape, codebook.shape, x.dtype, codebook.dtype, x.device, codebook.device, metric, k,
                              precision, algorithm, plan)
    if torch.float64 in (x.dtype, codebook.dtype):  # cast to fp32 below: values past its range would turn to inf
        check_fp32_range(x, codebook)
    x = int32_columns(x if x.dtype == dt else x.to(dt))
    codebook = int32_columns(codebook if codebook.dtype == dt else codebook.to(dt))
    grouped = x.ndim == 3
    split = split_k if split_k > 0 else None
    if kernel == "packed" and not grouped and x.shape[0] <= rows:  # one codebook, one launch: no group axis added
        return packed_launch.nearest_packed(x, codebook, return_dist, split, plan=plan)
    xg, cg = (x, codebook) if grouped else (x[None], codebook[None])

    def search(xp: Tensor, cp: Tensor) -> tuple[Tensor, Tensor]:
        if kernel == "packed":
            return packed_launch.nearest_packed(xp, cp, return_dist, split, plan=plan)
        if kernel == "tiled":
            return nearest_tiled(xp, cp, metric == "cosine", precision, return_dist, split, plan)
        return nearest_topk(xp, cp, k, metric == "cosine", precision, return_dist, split)

    if xg.shape[0] <= MAX_GROUPS and xg.shape[1] <= rows:
        dist, idx = search(xg, cg)
    else:  # inputs past what one launch indexes: pieces of groups and rows, each one launch
        parts = [[search(xr, cp) for xr in xp.split(rows, dim=1)]
                 for xp, cp in zip(xg.split(MAX_GROUPS), cg.split(MAX_GROUPS))]

        def joined(j: int) -> Tensor:  # rows back together, then groups
            return torch.cat([torch.cat([piece[j] for piece in p], dim=1) for p in parts])

        dist, idx = (joined(0) if return_dist else xg.new_empty(0, dtype=torch.float32)), joined(1)
    if not grouped:
        dist, idx = (dist[0] if return_dist else dist), idx[0]
    return dist, idx


@torch.library.custom_op("tokenizers_vq::nearest_codes", mutates_args=())
def _nearest_op(x: Tensor, codebook: Tensor, metric: str, k: int, precision: str, return_dist: bool,
                split_k: int, algorithm: str = "auto") -> tuple[Tensor, Tensor]:
    return _nearest_impl(x, codebook, metric, k, precision, return_dist, split_k, algorithm)


@_nearest_op.register_fake
def _(x, codebook, metric, k, precision, return_dist, split_k, algorithm="auto"):
    shape = x.shape[:-1] + ((k,) if k > 0 else ())
    dist = x.new_empty(shape if return_dist else (0,), dtype=torch.float32)
    return dist, x.new_empty(shape, dtype=torch.int64)


def nearest_codes_triton(x: Tensor, codebook: Tensor, metric: str = "l2", k: int | None = None,
                         return_dist: bool = True, precision: str = "tf32",
                         split_k: int | None = None, algorithm: str = "auto",
                         plan: SearchPlan | None = None) -> tuple[Tensor | None, Tensor]:
    """Nearest codeword(s) of each row, fused: never materialises ``N x K``.

    Accepts ``x (N, d)`` with ``codebook (K, d)``, or ``G`` codebooks in one launch as
    ``x (G, N, d)`` with ``codebook (G, K, d)``; any ``d >= 1``, any ``K >= 1``, any
    strides; fp32, bf16 or fp16 (mixed inputs are promoted; dot products accumulate in
    fp32). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

    Args:
        x: queries ``(N, d)`` or ``(G, N, d)``.
        codebook: codewords ``(K, d)`` or ``(G, K, d)``.
        metric: ``"l2"`` (squared Euclidean incl. ``|x|^2``, clamped at 0) or
            ``"cosine"`` (``1 - cos``), as :func:`nearest_codes_reference`.
        k: ``None`` for the nearest code; ``1 <= k <= min(8, K)`` for the ``k`` nearest,
            ascending (adds a trailing ``k`` axis to both outputs).
        return_dist: when False the distances are not written and ``None`` is returned.
        precision: fp32 dot products as ``"tf32"`` (tensor cores, default),
            ``"tf32x3"`` or ``"ieee"`` (exact fp32 products: indices match fp32 math).
            Ignored for 16-bit inputs.
        split_k: programs per row block over the codebook; ``None`` picks it from the
            GPU size (more when ``N`` is small).
        plan: the kernels' tuning choices (:class:`~tokenizers_vq.kernels.plan.SearchPlan`;
            default :data:`~tokenizers_vq.kernels.plan.DEFAULT_PLAN`), eager calls only.
        algorithm: ``"auto"`` (default; ``"packed"`` is the same) runs the packed
            kernel of :mod:`tokenizers_vq.kernels.packed` where it applies: ``l2``,
            ``k=None``, bf16 with ``d <= 256``, or fp32 with ``"tf32"`` and ``d <= 58``
            (bf16 d 11-16 and 27-32 pad to a row twice as wide; a second dot, or at
            123-128 and 251-256 an initial accumulator, holds the norms for fp32 d 11-16
            and 27-32, and in bf16 for 59-64, 123-128 and 251-256;
            the augmented codebook copy is capped at 64 MiB). Everything else runs the tiled kernel,
            which ``"tiled"`` forces. The packed
            kernel's indices may also differ from the exact argmin on near-ties
            within a relative ``2^-13`` of the distance (then the lowest index wins), and
            it does not resolve distances below fp32's normal range (about ``1e-38``:
            values near ``1e-19``; scale such data up or force ``"tiled"``).

    Returns:
        ``(dist, idx)``: fp32 and int64, shaped ``(N,)`` / ``(G, N)`` (``(..., k)`` with
        ``k``). Ties go to the lowest index. A row holding NaN or Inf gets the first code(s),
        at distance NaN (a NaN row) or inf, as the torch path gives it; so does a row whose
        squared norm overflows fp32 (entries past about ``1.8e19``), and a code's squared
        norm must stay within fp32 too. Inputs past what one launch indexes in int32 (more
        than 65,535 groups, or ``N k K / 256`` past ``2^31``) run in pieces.
    """
    relaunch.check_device(x, "the Triton search", "use tokenizers_vq.quantizers.nearest_codes, which runs the torch "
                          "search there")
    if k is not None:
        _check_shapes(x.shape, codebook.shape, x.device, codebook.device, metric, precision, algorithm)
        if not 1 <= k <= min(8, codebook.shape[-2]):
            raise ValueError(f"k must be in [1, min(8, K)], got {k}")
    if plain_eager(x, codebook):  # (its dispatch measured by eval.benchmarks.host_cost)
        dist, idx = _nearest_impl(x, codebook, metric, k or 0, precision, return_dist, split_k or 0, algorithm,
                                  plan or DEFAULT_PLAN)
    elif plan is not None and plan != DEFAULT_PLAN:
        raise ValueError("a search plan other than the default is for eager calls on plain tensors (tests, tuning); "
                         "under torch.compile or with tensor subclasses the custom op runs the default")
    else:
        dist, idx = _nearest_op(x, codebook, metric, k or 0, precision, return_dist, split_k or 0, algorithm)
    return (dist if return_dist else None), idx
