"""Quantizer state that must not move: a k-means initialisation given up on is not run again
after a resume, a frozen level stays frozen through ``encode_levels``, a shrunk codebook
keeps its quantizer's dtype, random-projection targets load only into the input
normalisation they were made with, and a setting out of its range is named."""

from __future__ import annotations

import copy

import pytest
import torch

from tokenizers_vq.quantizers import VectorQuantizer
from tokenizers_vq.quantizers.hierarchical import HierarchicalQuantizer
from tokenizers_vq.quantizers.shrink import shrink_codebook


def test_a_skipped_kmeans_init_is_not_run_again_after_a_resume():
    """A first batch of non-finite rows (fp16 overflow with the check off) skips the init;
    a quantizer loaded from that state trains on exactly as the one it was saved from."""
    torch.manual_seed(0)
    q = VectorQuantizer(16, 64, kmeans_init=True, check_finite=False)
    q(torch.full((2, 8, 16), float("inf")))  # init given up on: the random codebook stays
    for _ in range(3):
        q(torch.randn(4, 32, 16))
    resumed = VectorQuantizer(16, 64, kmeans_init=True, check_finite=False)
    resumed.load_state_dict(q.state_dict())
    straight = copy.deepcopy(q)
    x = torch.randn(4, 32, 16)
    for model in (straight, resumed):  # (dead-code restarts draw from the global generator)
        torch.manual_seed(1)
        model(x)
    assert torch.equal(resumed.embed, straight.embed)


def test_encode_levels_keeps_each_levels_mode_and_takes_half_precision():
    torch.manual_seed(0)
    hq = HierarchicalQuantizer(VectorQuantizer(8, 32), VectorQuantizer(8, 32)).train()
    hq.top.eval()  # a frozen top codebook
    z = torch.randn(2, 4, 4, 8)
    levels = hq.encode_levels(z.bfloat16())
    assert levels["top"].shape == hq.encode_levels(z)["top"].shape == (2, 2, 2)  # bf16 taken, as encode takes it
    assert hq.training and not hq.top.training
    before = hq.top.embed.clone()
    hq(z)
    assert torch.equal(hq.top.embed, before)  # still frozen: its EMA did not move


def test_a_shrunk_codebook_keeps_its_quantizers_dtype():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 64).to(torch.bfloat16)
    small, remap = shrink_codebook(vq, 16, iters=3)
    assert small.embed.dtype == torch.bfloat16 and remap.shape == (64,)


def test_random_projection_targets_refuse_to_load_into_the_other_input_normalisation():
    from tokenizers_vq.quantizers.random_projection import RandomProjectionQuantizer  # noqa: PLC0415

    saved = RandomProjectionQuantizer(16, 64, normalize_input=False).state_dict()
    with pytest.raises(ValueError, match="saved with normalize_input False cannot load into a "
                                         "RandomProjectionQuantizer with normalize_input True"):
        RandomProjectionQuantizer(16, 64).load_state_dict(saved)
    again = RandomProjectionQuantizer(16, 64, normalize_input=False)
    again.load_state_dict(saved)
    old = {k: v for k, v in saved.items() if k != "_normalize_input"}  # weights saved before the setting was kept
    RandomProjectionQuantizer(16, 64, normalize_input=False).load_state_dict(old)


@pytest.mark.parametrize("setting", [{"orthogonal_sample": 0}, {"diversity_sample": 2.5}, {"kmeans_iters": -3},
                                     {"dead_code_threshold": -1}, {"beta": float("nan")}, {"decay": 1.0}])
def test_a_vector_quantizer_setting_out_of_range_is_named(setting):
    from tokenizers_vq.quantizers import VectorQuantizer  # noqa: PLC0415

    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name} must be a (whole )?number in"):
        VectorQuantizer(8, 16, **setting)


def test_counts_given_as_floats_are_named():
    from tokenizers_vq.quantizers import LFQ, ResidualQuantizer, VectorQuantizer  # noqa: PLC0415
    from tokenizers_vq.quantizers.random_projection import RandomProjectionQuantizer  # noqa: PLC0415

    for build, name in ((lambda: LFQ(8, num_bits=4.0), "num_bits"),
                        (lambda: RandomProjectionQuantizer(8, codebook_size=2.0), "codebook_size"),
                        (lambda: ResidualQuantizer([VectorQuantizer(8, 16)] * 2, beam_size=2.5), "beam_size")):
        with pytest.raises(ValueError, match=f"{name} must be a whole number"):
            build()


_NAN = float("nan")


@pytest.mark.parametrize("build, named", [
    ("DynamicQuantizer(VectorQuantizer(8, 16), tau=_NAN)", "tau must be a number in"),  # NaN quantized values
    ("DynamicQuantizer(VectorQuantizer(8, 16), threshold_decay=1.5)", "threshold_decay must be a number in"),
    ("DynamicQuantizer(VectorQuantizer(8, 16), budget_weight=-1)", "budget_weight must be a number in"),
    ("VectorQuantizer(8, 16, diversity_weight=_NAN)", "diversity_weight must be a number in"),  # a NaN total loss
    ("VectorQuantizer(8, 16, learning='loss', orthogonal_weight=-1)", "orthogonal_weight must be a number in"),
    ("VectorQuantizer(2.5, 16)", "dim must be a whole number"),
    ("VectorQuantizer(8, 16, backend='cuda')", "backend must be one of 'auto', 'torch', 'triton'"),
    ("LFQ(8, 8, commitment_weight=_NAN)", "commitment_weight must be a number in"),
    ("SimVQ(8, 16, beta=-1)", "beta must be a number in"),  # a negative commitment loss
    ("IBQ(8, 16, entropy_weight=-1)", "entropy_weight must be a number in"),
    ("FSQ(3, '855')", "levels must be a non-empty list"),  # not read as [8, 5, 5]
    ("FSQ(3, 5)", "levels must be a non-empty list"),
    ("MultiScaleResidualQuantizer(8, 16, scales=(1.5, 3))", "scales must be strictly increasing whole"),  # not read as [1, 3]
    ("MultiScaleResidualQuantizer(8, 16, scales=(1, 1, 2))", "scales must be strictly increasing whole"),
    ("MultiScaleResidualQuantizer(8, 16, beta=-1)", "beta must be a number in"),
    ("ProjectedCodebookVQ(8, 16, init_batches=0)", "init_batches must be a whole number"),
])
def test_an_option_out_of_its_range_is_named_as_the_quantizer_is_built(build, named):
    from tokenizers_vq import quantizers  # noqa: PLC0415

    with pytest.raises(ValueError, match=named):
        eval(build, {**vars(quantizers), "_NAN": _NAN})


def _running_state(q: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items() if k != "steps"}


def test_a_finite_row_whose_square_overflows_leaves_the_affine_statistics_as_they_were():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 16, learning="loss", affine=True, check_finite=False).train()
    q(torch.randn(64, 8))
    names = ("latent_mean", "latent_var", "embed_mean", "embed_std")
    before = {k: getattr(q, k).clone() for k in names}
    bad = torch.randn(64, 8)
    bad[0] = 1e30  # finite, but its square is not in fp32
    q(bad)
    for k in names:
        assert torch.equal(getattr(q, k), before[k]), k
    assert torch.isfinite(q.codebook).all()


def test_a_non_finite_batch_leaves_a_sharded_codebook_as_it_was():
    from tokenizers_vq.quantizers.sharded import ShardedVectorQuantizer  # noqa: PLC0415

    torch.manual_seed(0)
    q = ShardedVectorQuantizer(8, 16, dead_code_threshold=0.5, check_finite=False).train()
    q(torch.randn(64, 8))
    before = _running_state(q)
    for value in (float("nan"), float("inf"), 3e38):
        bad = torch.randn(64, 8)
        bad[3:11, 2] = value  # (3e38: finite rows whose sum overflows)
        q(bad)
        for k, v in _running_state(q).items():
            assert torch.equal(v, before[k]), k
    q(torch.randn(64, 8))
    assert not torch.equal(q.cluster_size, before["cluster_size"]) and torch.isfinite(q.embed).all()


def test_a_non_finite_batch_leaves_the_dynamic_routers_threshold_as_it_was():
    from tokenizers_vq.quantizers import DynamicQuantizer  # noqa: PLC0415

    torch.manual_seed(0)
    dq = DynamicQuantizer(VectorQuantizer(16, 64, check_finite=False), target_fine_ratio=0.5).train()
    for _ in range(5):
        dq(torch.randn(8, 8, 8, 16))
    before = dq.threshold.clone()
    bad = torch.randn(8, 8, 8, 16)
    bad[0, 0, 0, 0] = float("nan")
    dq(bad)
    assert torch.equal(dq.threshold, before)
    dq(torch.randn(8, 8, 8, 16))
    assert torch.isfinite(dq.threshold) and not torch.equal(dq.threshold, before)


def test_vector_quantizer_weights_refuse_to_load_into_the_other_metric():
    from tokenizers_vq.quantizers import VectorQuantizer  # noqa: PLC0415

    saved = VectorQuantizer(8, 16, metric="cosine").state_dict()
    with pytest.raises(ValueError, match="saved with metric 'cosine' cannot load into a VectorQuantizer with metric 'l2'"):
        VectorQuantizer(8, 16).load_state_dict(saved)
    again = VectorQuantizer(8, 16, metric="cosine")
    again.load_state_dict(saved)
    assert torch.equal(again.embed, saved["embed"])
    old = {k: v for k, v in saved.items() if k != "_metric"}  # weights without the key load as the quantizer's
    VectorQuantizer(8, 16, metric="cosine").load_state_dict(old)


def test_projected_codebook_weights_refuse_to_load_into_the_other_metric():
    from tokenizers_vq.quantizers import ProjectedCodebookVQ  # noqa: PLC0415

    saved = ProjectedCodebookVQ(8, 16, features=torch.randn(16, 8), metric="cosine").state_dict()
    with pytest.raises(ValueError, match="saved with metric 'cosine' cannot load into a ProjectedCodebookVQ with "
                                         "metric 'l2'"):
        ProjectedCodebookVQ(8, 16, features=torch.randn(16, 8)).load_state_dict(saved)
    ProjectedCodebookVQ(8, 16, features=torch.randn(16, 8), metric="cosine").load_state_dict(saved)
