"""The fused Triton paths of a :class:`~tokenizers_vq.VectorQuantizer` training step on CUDA: the
straight-through output with the commitment loss (:func:`tokenizers_vq.kernels.commit.commit_ste_triton`)
and the EMA codebook's update (:func:`tokenizers_vq.kernels.ema.ema_update_triton`): four launches for
what the torch version does in about 65 operations, with the same result within fp32 rounding; under
``torch.compile`` as custom ops (the graph keeps them). Each returns None, changing nothing, where it does
not apply; the quantizer then runs the torch version."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokenizers_vq import distributed as tdist
from tokenizers_vq.kernels._host import plain_eager
from tokenizers_vq.quantizers._functional import _triton_op

if TYPE_CHECKING:
    from tokenizers_vq.quantizers.vq import VectorQuantizer

ENABLED = True
"""Set False to run the torch version everywhere (comparisons, debugging)."""


def _triton_search(vq: VectorQuantizer, *tensors: Tensor) -> bool:
    """Whether ``vq``'s search runs in Triton on these tensors (``backend="triton"``, or ``"auto"``
    on CUDA; eager on plain tensors or under ``torch.compile``), with fp32 contiguous ones after the first."""
    if not ENABLED or not tensors[0].shape[0] or vq.backend == "torch":
        return False
    if not (torch.compiler.is_compiling() or plain_eager(*tensors)):  # a tensor subclass: the torch version
        return False
    return (vq.backend == "triton" or tensors[0].is_cuda) and \
        all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors[1:])


def fused_commit(vq: VectorQuantizer, x: Tensor, codebook: Tensor, idx: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(q, commitment)`` of a training step of ``vq`` with the EMA codebook and the straight-through
    estimator: ``codebook[idx]`` with the gradient passed to the rows ``x`` ``(N, d)``, and the
    commitment loss; or None (another estimator or learning, evaluation, a torch search)."""
    if not (vq.training and vq.learning == "ema" and vq.estimator == "ste" and x.dtype == torch.float32):
        return None
    op = _triton_op("commit_ste_triton") if _triton_search(vq, x, codebook) else None
    return None if op is None else op(x, codebook, idx, vq.beta)


def fused_update(vq: VectorQuantizer, x: Tensor, counts: Tensor, sums: Tensor | None) -> dict[str, Tensor] | None:
    """Update ``vq``'s EMA statistics and codebook from this step's ``counts`` ``(K,)`` and ``sums``
    ``(K, d)`` of its rows ``x`` ``(N, d)`` (fp32, as searched), restart its dead codes, and return
    its metrics; or None, changing nothing, where the fused kernels do not apply: evaluation, a learned
    codebook (no ``sums``), the affine re-parameterisation, several ranks (restarts take rank 0's
    rows), an empty batch, buffers that
    are not contiguous fp32, more codes than the kernels take (``kernels.ema.MAX_CODES``), or a search
    that runs in torch (``backend="torch"``, or ``"auto"`` off CUDA)."""
    if sums is None or not vq.training or vq.affine or tdist.is_distributed():
        return None
    op = _triton_op("ema_update_triton") if _triton_search(vq, x, vq.embed, vq.embed_sum, vq.cluster_size, sums) else None
    if op is None:
        return None
    from tokenizers_vq.kernels.ema import MAX_CODES, METRICS  # noqa: PLC0415  (Triton is imported by now)

    if vq.codebook_size > MAX_CODES:
        return None
    restart = vq.restart_dead_codes and vq.dead_code_threshold > 0
    state = (vq.cluster_size, vq.embed_sum, vq.embed, vq.restarts)
    out = op(counts, sums, *state, x, decay=vq.decay, eps=vq.eps, threshold=vq.dead_code_threshold, restart=restart,
             cosine=vq.metric == "cosine")
    if not torch.compiler.is_compiling():  # (compiled, the custom op declares what it writes)
        torch.autograd.graph.increment_version(state)  # written in place: autograd refuses a graph that saved them
    return dict(zip(METRICS if restart else METRICS[:-1], out.unbind()))
