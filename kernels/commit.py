"""The straight-through output and commitment loss of a VQ training step, fused (Triton).

For rows ``x (N, d)`` and their codes, the quantizer returns ``q = C[idx]`` with the gradient
passed to ``x`` unchanged and the commitment loss ``beta * mean((x - q)^2)`` (whose gradient
reaches ``x`` only). In torch that is a gather, a loss, the straight-through sum and, backwards,
the loss's gradient and two more elementwise passes over ``N x d``. Here one launch gathers ``q``
and writes per-block partial sums of the scaled squared error; one launch backwards writes
``g + 2 scale * grad_loss * (x - C[idx])`` from a copy of the codebook taken in the forward pass (the EMA update
rewrites the codebook before the backward pass; ``K x d`` kept rather than ``q``'s ``N x d``, and the
output stays the caller's to change in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenizers_vq.kernels import _compat  # noqa: F401  (interpreter fix, before any launch)
from tokenizers_vq.kernels import relaunch
from tokenizers_vq.kernels._host import cdiv, int32_columns, next_pow2, plain_eager


@triton.jit
def _commit_fwd_kernel(X, C, IDX, Q, PART, N, D, sxn, sxd, scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N),)``: ``Q[rows] = C[IDX[rows]] + (x - x)`` (NaN where ``x`` is NaN or
    Inf, as the torch straight-through sum gives) and ``PART[p] = scale * sum (x - q)^2`` over the block."""
    pid = tl.program_id(0)
    rr = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rr < N
    code = tl.load(IDX + rr, mask=rm, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = rm[:, None] & (dd < D)[None, :]
        x = tl.load(X + rr.to(tl.int64)[:, None] * sxn + dd[None, :] * sxd, mask=m, other=0.0)
        q = tl.load(C + code[:, None] * D + dd[None, :], mask=m, other=0.0)
        err = x - q
        acc += err * err
        tl.store(Q + rr.to(tl.int64)[:, None] * D + dd[None, :], q + (x - x), mask=m)
    tl.store(PART + pid, tl.sum(tl.sum(acc, axis=1), axis=0) * scale)


@triton.jit
def _commit_bwd_kernel(G, X, C, IDX, GLOSS, GX, N, D, sxn, sxd, sgn, sgd, scale2,
                       HAS_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N),)``: ``GX = G + scale2 * GLOSS * (X - C[IDX])`` (``G`` taken as zero
    without ``HAS_G``; ``GLOSS`` the loss's scalar gradient)."""
    pid = tl.program_id(0)
    rr = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rr < N
    code = tl.load(IDX + rr, mask=rm, other=0).to(tl.int64)
    coef = tl.load(GLOSS).to(tl.float32) * scale2
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = rm[:, None] & (dd < D)[None, :]
        rows = rr.to(tl.int64)[:, None]
        x = tl.load(X + rows * sxn + dd[None, :] * sxd, mask=m, other=0.0)
        q = tl.load(C + code[:, None] * D + dd[None, :], mask=m, other=0.0)
        gx = coef * (x - q)
        if HAS_G:
            gx += tl.load(G + rows * sgn + dd[None, :] * sgd, mask=m, other=0.0)
        tl.store(GX + rows * D + dd[None, :], gx, mask=m)


def _blocks(d: int) -> tuple[int, int]:
    block_d = min(128, next_pow2(d))
    return max(1, min(64, 4096 // block_d)), block_d


def _scale(beta: float, x: Tensor) -> float:
    """The loss's factor on the squared error's sum: ``beta`` over the elements of ``x``."""
    return beta / max(x.numel(), 1)


def _forward(x: Tensor, codebook: Tensor, idx: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(q, loss)``: the gathered codewords and ``beta`` times the squared error's mean (two launches)."""
    n, d = x.shape
    block_n, block_d = _blocks(d)
    q = torch.empty(n, d, device=x.device, dtype=torch.float32)
    part = torch.empty(cdiv(n, block_n), device=x.device, dtype=torch.float32)
    relaunch.launch(_commit_fwd_kernel, (part.shape[0],), x, codebook, idx, q, part, n, d, *x.stride(), _scale(beta, x),
                    BLOCK_N=block_n, BLOCK_D=block_d)
    return q, part.sum()


def _backward(grad_q: Tensor | None, grad_loss: Tensor, x: Tensor, codebook: Tensor, idx: Tensor, beta: float) -> Tensor:
    """``grad_q + grad_loss * 2 beta / numel * (x - codebook[idx])`` in one launch (``grad_q`` None: taken as zero)."""
    n, d = x.shape
    block_n, block_d = _blocks(d)
    gx = torch.empty(n, d, device=x.device, dtype=torch.float32)
    g = int32_columns(grad_q) if grad_q is not None else gx
    relaunch.launch(_commit_bwd_kernel, (cdiv(n, block_n),), g, x, codebook, idx, grad_loss, gx, n, d, *x.stride(),
                    *g.stride(), 2.0 * _scale(beta, x), HAS_G=grad_q is not None, BLOCK_N=block_n, BLOCK_D=block_d)
    return gx


def _input_grad(grad_q: Tensor | None, grad_loss: Tensor | None, beta: float, x: Tensor, codebook: Tensor,
                idx: Tensor, backward=_backward) -> Tensor | None:
    """The rows' gradient from ``q``'s (passed straight through) and the loss's (``beta`` times the
    squared error's mean): ``grad_q`` alone for an unused loss; under ``create_graph`` torch operations,
    differentiable again; else ``backward``'s one launch."""
    if grad_loss is None:
        return grad_q
    if torch.is_grad_enabled():
        gx = grad_loss * (2.0 * _scale(beta, x)) * (x - codebook[idx])
        return gx if grad_q is None else grad_q + gx
    return backward(None if grad_q is None else grad_q.float(), grad_loss, x, codebook, idx, beta)


class _CommitSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, codebook: Tensor, idx: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no pass over N x d for it)
        ctx.beta = beta
        ctx.save_for_backward(x, codebook.clone(), idx)
        return _forward(x, codebook, idx, beta)

    @staticmethod
    def backward(ctx, grad_q: Tensor | None, grad_loss: Tensor | None):
        return _input_grad(grad_q, grad_loss, ctx.beta, *ctx.saved_tensors), None, None, None


# For torch.compile: the same launches as custom ops, the forward also returning the codebook's copy
# (beta, not beta / numel, is the ops' argument: a float worked out from the batch's size would be a guard on it).
@torch.library.custom_op("tokenizers_vq::commit_ste", mutates_args=())
def _commit_op(x: Tensor, codebook: Tensor, idx: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    return *_forward(x, codebook, idx, beta), codebook.clone()


@_commit_op.register_fake
def _(x, codebook, idx, beta):
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty((), dtype=torch.float32), torch.empty_like(codebook)


@torch.library.custom_op("tokenizers_vq::commit_ste_backward", mutates_args=())
def _commit_backward_op(grad_q: Tensor | None, grad_loss: Tensor, x: Tensor, codebook: Tensor, idx: Tensor,
                        beta: float) -> Tensor:
    return _backward(grad_q, grad_loss, x, codebook, idx, beta)


@_commit_backward_op.register_fake
def _(grad_q, grad_loss, x, codebook, idx, beta):
    return x.new_empty(x.shape, dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    x, _, idx, ctx.beta = inputs
    ctx.save_for_backward(x, output[2], idx)


def _commit_op_backward(ctx, grad_q: Tensor | None, grad_loss: Tensor | None, _grad_copy: Tensor | None):
    return _input_grad(grad_q, grad_loss, ctx.beta, *ctx.saved_tensors, backward=_commit_backward_op), None, None, None


_commit_op.register_autograd(_commit_op_backward, setup_context=_setup)


def commit_ste_triton(x: Tensor, codebook: Tensor, idx: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The codewords of ``x`` with the straight-through gradient, and the commitment loss.

    Args:
        x: ``(N, d)`` fp32 rows (any strides); the gradient flows to it.
        codebook: ``(K, d)`` contiguous fp32 codewords (no gradient reaches them).
        idx: ``(N,)`` integer codes in ``[0, K)`` (not checked: a code outside reads outside the codebook).
        beta: the commitment weight.

    Returns:
        ``(q, loss)``: ``q (N, d)`` equal to ``codebook[idx]`` (NaN where ``x`` is NaN or Inf, as
        ``q + (x - x)`` gives), whose gradient reaches ``x`` unchanged; ``loss`` the
        scalar ``beta * mean((x - q)^2)``, whose gradient reaches ``x`` as ``2 beta (x - q) / (N d)``
        (with ``create_graph=True`` built from torch operations, so it differentiates again).
    """
    relaunch.check_device(x, "commit_ste_triton", "use the quantizer's torch straight-through estimator there")
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1] or idx.shape != x.shape[:1]:
        raise ValueError(f"commit_ste_triton expects x (N, d), codebook (K, d) and idx (N,); got {tuple(x.shape)}, "
                         f"{tuple(codebook.shape)} and {tuple(idx.shape)}")
    if x.dtype != torch.float32 or codebook.dtype != torch.float32 or not codebook.is_contiguous():
        raise ValueError(f"commit_ste_triton takes fp32 rows and a contiguous fp32 codebook, got {x.dtype} and "
                         f"{codebook.dtype}")
    x, codebook, idx = int32_columns(x), codebook.detach(), idx.contiguous()
    if plain_eager(x, codebook, idx):
        return _CommitSTE.apply(x, codebook, idx, float(beta))
    return _commit_op(x, codebook, idx, float(beta))[:2]
