"""Which VectorQuantizer training steps take the fused Triton kernels (``quantizers._fused``).

The kernels themselves are checked against the torch version in ``tests/kernels``; here the
decision alone, on the CPU with the kernels replaced by recorders: the fused path is taken on
the Triton backend in a training step with the EMA codebook, eager or under ``torch.compile``,
and nowhere else (a torch search, another estimator or learning, affine, evaluation, a tensor
subclass in eager mode; the update alone not with several ranks, buffers that are not fp32 or
too many codes for its kernels).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vq import VectorQuantizer
from tokenizers_vq.quantizers import _fused

pytest.importorskip("triton")


def _recorders(calls: list):
    def commit(x, codebook, idx, beta):
        calls.append("commit")
        q = codebook[idx]
        return q + (x - x.detach()), beta * F.mse_loss(x, q)

    def update(*args, **kwargs):
        calls.append("update")
        return torch.zeros(6)

    return {"commit_ste_triton": commit, "ema_update_triton": update}


def _decisions(vq: VectorQuantizer, compiling: bool = False, distributed: bool = False) -> list:
    """The fused parts ``vq`` takes for one batch of rows (nothing runs but the recorders)."""
    calls: list = []
    ops = _recorders(calls)
    x = torch.randn(20, vq.codebook_dim)
    idx = torch.randint(0, vq.codebook_size, (20,))
    counts = torch.bincount(idx, minlength=vq.codebook_size).float()
    sums = torch.zeros(vq.codebook_size, vq.codebook_dim).index_add_(0, idx, x) if vq.learning == "ema" else None
    with mock.patch.object(_fused, "_triton_op", side_effect=ops.get), \
            mock.patch("torch.compiler.is_compiling", return_value=compiling), \
            mock.patch.object(_fused.tdist, "is_distributed", return_value=distributed):
        commit = _fused.fused_commit(vq, x, vq.codebook, idx)
        update = _fused.fused_update(vq, x, counts, sums)
    assert (commit is None) == ("commit" not in calls) and (update is None) == ("update" not in calls)
    return calls


def test_an_eager_ema_step_on_the_triton_backend_takes_both_fused_parts():
    for metric in ("l2", "cosine"):
        vq = VectorQuantizer(8, 40, metric=metric, backend="triton").train()
        assert _decisions(vq) == ["commit", "update"], metric
        assert _decisions(vq, compiling=True) == ["commit", "update"], metric  # as custom ops in the graph
    vq = VectorQuantizer(8, 40, backend="triton", restart_dead_codes=False).train()
    with mock.patch.object(_fused, "_triton_op", side_effect=_recorders([]).get):
        metrics = _fused.fused_update(vq, torch.randn(5, 8), torch.zeros(40), torch.zeros(40, 8))
    assert "restarted" not in metrics and list(metrics)[:4] == ["perplexity", "usage_batch", "usage_window", "dead_codes"]


@pytest.mark.parametrize("case, want", [
    ("torch backend", []), ("auto backend on the CPU", []), ("several ranks", ["commit"]),
    ("rotation estimator", ["update"]), ("nsvq estimator", ["update"]), ("learned codebook", []),
    ("affine", []), ("evaluation", []), ("switched off", []), ("half-precision buffers", ["commit"]),
    ("more codes than the update takes", ["commit"]),
])
def test_the_torch_version_runs_wherever_the_fused_kernels_do_not_apply(case, want):
    options = {"rotation estimator": {"estimator": "rotation"}, "nsvq estimator": {"estimator": "nsvq"},
               "learned codebook": {"learning": "loss"}, "affine": {"learning": "loss", "affine": True},
               "torch backend": {"backend": "torch"}, "auto backend on the CPU": {"backend": "auto"}}.get(case, {})
    size = 41 if case == "more codes than the update takes" else 40
    vq = VectorQuantizer(8, size, **{"backend": "triton", **options}).train(case != "evaluation")
    if case == "half-precision buffers":
        vq.embed = vq.embed.half()
    with mock.patch.object(_fused, "ENABLED", case != "switched off"), \
            mock.patch("tokenizers_vq.kernels.ema.MAX_CODES", 40):
        assert _decisions(vq, compiling=case == "compiling", distributed=case == "several ranks") == want


def test_a_tensor_subclass_in_eager_mode_takes_the_torch_version():
    vq = VectorQuantizer(8, 40, backend="triton").train()
    x = torch.nn.Parameter(torch.randn(20, 8))  # (a subclass of Tensor)
    idx = torch.randint(0, 40, (20,))
    with mock.patch.object(_fused, "_triton_op", side_effect=_recorders(calls := []).get):
        assert _fused.fused_commit(vq, x, vq.codebook, idx) is None
        assert _fused.fused_update(vq, x, torch.zeros(40), torch.zeros(40, 8)) is None
        with mock.patch("torch.compiler.is_compiling", return_value=True):  # traced: the compiler sees through it
            assert _fused.fused_commit(vq, x, vq.codebook, idx) is not None
    assert calls == ["commit"]
