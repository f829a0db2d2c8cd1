"""VectorQuantizer: search reference, EMA arithmetic, k-means, restarts, estimators."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vq import VectorQuantizer, nearest_codes
from tokenizers_vq.quantizers._functional import nearest_codes_reference, noise_substitution, rotation_trick


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (7, 17, 3), (1000, 1000, 24), (300, 5000, 5)])
def test_reference_search_matches_fp64_brute_force_across_block_sizes(metric, n, k, d):
    x, c = torch.randn(n, d), torch.randn(k, d)
    xd, cd = x.double(), c.double()
    if metric == "cosine":
        xd, cd = F.normalize(xd, dim=-1), F.normalize(cd, dim=-1)
        full = 1 - xd @ cd.t()
    else:
        full = torch.cdist(xd, cd).pow(2)
    ref_d, ref_i = full.min(1)
    two = full.topk(min(2, k), dim=1, largest=False).values
    gap = (two[:, -1] - two[:, 0]) if k > 1 else torch.full((n,), float("inf"), dtype=torch.float64)
    for block in (-(-k // 3), 4 * k, 2**24):  # 3 K blocks; N blocks of 4 rows; one block
        dist, idx = nearest_codes_reference(x, c, metric, block_elems=block)
        # fp32 rounding of |x|^2 - 2x.c + |c|^2: differ only where the best two are within it
        bound = 1e-5 * (xd.pow(2).sum(1) + cd.pow(2).sum(1).max()) + 1e-6
        clear = gap > bound
        assert torch.equal(idx[clear], ref_i[clear])
        torch.testing.assert_close(dist.double(), ref_d, atol=bound.max().item(), rtol=0)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_go_to_the_lowest_index_across_blocks(metric):
    """Equal codewords in blocks of other shapes (single rows, a short last block, one block)
    are rounded differently by the BLAS; the answer must not be. Other CPU settings:
    tests/test_determinism.py."""
    torch.manual_seed(0)
    c = torch.randn(10, 4).repeat(3, 1)  # every codeword three times: at i, i+10, i+20
    x = torch.cat([c[torch.randint(0, 30, (49,))] + 0.01 * torch.randn(49, 4), c[[29]]])  # and one exactly on c[9]
    answers = [nearest_codes_reference(x, c, metric, block_elems=block) for block in (1, 4, 11, 2**24)]
    answers.append(tuple(torch.cat(t) for t in zip(*(nearest_codes_reference(r, c, metric) for r in x.split(1)))))
    for dist, idx in answers:
        assert int(idx.max()) < 10
        assert torch.equal(idx, answers[0][1]) and torch.equal(dist, answers[0][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_whose_squares_overflow_fp32_are_compared_exactly(dtype):
    """|x| ~ 1e20 and beyond: the fp32 screening scores overflow; such rows go to the fp64
    exact pass whole, which finds the exact match. Infinite values are not refused."""
    x = torch.tensor([[1e20, 0.0], [0.5, 0.0], [3e19, 0.0]]).to(dtype)
    c = torch.tensor([[1e19, 0.0], [1e20, 0.0], [0.4, 0.0], [2.9e19, 0.0], [3e19, 0.0]]).to(dtype)
    for block in (1, 2**24):
        dist, idx = nearest_codes_reference(x, c, "l2", block_elems=block)
        assert idx.tolist() == [1, 2, 4] and float(dist[0]) == float(dist[2]) == 0.0
        far = nearest_codes_reference(torch.tensor([[2e38, 0.0]]).to(dtype), torch.tensor([[-1e30, 0.0], [-1.0, 0.0]]).to(dtype),
                                      "l2", block_elems=block)
        assert far[1].tolist() == [1]
    big = torch.tensor([[1e40]], dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 values beyond float32's range"):
        nearest_codes_reference(big, torch.zeros(2, 1, dtype=torch.float64))
    inf_row = torch.tensor([[math.inf], [1.0]], dtype=torch.float64)
    assert nearest_codes_reference(inf_row, torch.tensor([[0.0], [1.0]], dtype=torch.float64))[1][1] == 1


@pytest.mark.parametrize("scale", [20.0, 1e3, 1e6])
def test_a_few_far_codewords_are_searched_apart_with_the_same_answer(monkeypatch, scale):
    """Codewords far longer than the rest (searched apart, else their length widens every
    row's screening to the whole codebook) give the answer of the plain search: the least
    exact distance, the lowest index on ties, index 0 for a NaN row."""
    from tokenizers_vq.quantizers import _reference  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    c = torch.randn(300, 6, generator=gen)
    c[[3, 150]] *= scale
    c[200] = c[150]  # a tie between two far codes: the lower index
    x = torch.cat([torch.randn(40, 6, generator=gen), c[[150, 3]] + 1e-3, torch.full((1, 6), math.nan)])
    assert _reference._far_codes(c).tolist() == [3, 150, 200]
    for block in (7, 2**24):
        got = nearest_codes_reference(x, c, "l2", block_elems=block)
        monkeypatch.setattr(_reference, "FAR_FACTOR", math.inf)
        plain = nearest_codes_reference(x, c, "l2", block_elems=block)
        monkeypatch.undo()
        assert torch.equal(got[1], plain[1]) and torch.equal(got[0].nan_to_num(-1), plain[0].nan_to_num(-1))
        assert got[1][40:].tolist() == [150, 3, 0]


def test_nearest_codes_rejects_bad_shapes_and_backends():
    with pytest.raises(ValueError, match="expects x"):
        nearest_codes(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        nearest_codes(torch.randn(3, 4), torch.randn(5, 4), backend="cuda")


def test_ema_update_follows_the_laplace_smoothed_formula():
    torch.manual_seed(0)
    k, d, decay, eps = 8, 3, 0.9, 1e-5
    vq = VectorQuantizer(d, k, decay=decay, eps=eps, restart_dead_codes=False)
    embed0, size0, sum0 = vq.embed.clone(), vq.cluster_size.clone(), vq.embed_sum.clone()
    x = torch.randn(1, 64, d)
    out = vq(x)
    idx = out.codes.view(-1)
    one_hot = F.one_hot(idx, k).double()  # the test may build what the module must not
    counts, sums = one_hot.sum(0), one_hot.t() @ x.view(-1, d).double()
    size = decay * size0.double() + (1 - decay) * counts
    esum = decay * sum0.double() + (1 - decay) * sums
    n = size.sum()
    smoothed = (size + eps) / (n + k * eps) * n
    torch.testing.assert_close(vq.cluster_size.double(), size)
    torch.testing.assert_close(vq.embed.double(), esum / smoothed[:, None])
    # codes were chosen against the codebook before the update
    assert torch.equal(idx, torch.cdist(x.view(-1, d), embed0).argmin(1))


def test_kmeans_init_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[10.0, 0], [-10, 0], [0, 10], [0, -10]])
    x = centres[torch.randint(0, 4, (4000,))] + 0.1 * torch.randn(4000, 2)
    vq = VectorQuantizer(2, 4, kmeans_init=True, kmeans_iters=20, restart_dead_codes=False)
    assert not bool(vq.initted)
    vq(x.unsqueeze(0))
    assert bool(vq.initted)
    # every true centre has a codeword within 0.5 (k-means seeds from data, then Lloyd)
    assert torch.cdist(centres, vq.embed).min(1).values.max() < 0.5


def test_dead_code_restart_survives_the_same_steps_ema_update():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 16, dead_code_threshold=0.5, decay=0.99)
    vq.embed[5] = 1e3  # far from every latent: never chosen
    vq.embed_sum[5] = 1e3 * vq.cluster_size[5]
    x = torch.randn(2, 100, 4)
    for _ in range(80):  # EMA count of code 5 decays 0.99^t from 1.0 below 0.5
        vq.embed[5], vq.embed_sum[5] = 1e3, 1e3 * vq.cluster_size[5]
        if vq.cluster_size[5] * 0.99 < 0.5:
            break
        vq(x)
    assert vq.cluster_size[5] * 0.99 < 0.5
    restarts_before = int(vq.restarts)
    out = vq(x)
    assert out.metrics["restarted"] >= 1 and int(vq.restarts) > restarts_before
    # the restarted codeword is one of this step's latents, not the EMA's value
    assert (vq.embed[5] - x.view(-1, 4)).abs().sum(1).min() == 0
    assert vq.cluster_size[5] == 1.0  # twice the threshold
    torch.testing.assert_close(vq.embed_sum[5] / vq.cluster_size[5], vq.embed[5])
    # and it stays near the data on the next step instead of jumping back
    vq(x)
    assert vq.embed[5].abs().max() < 10


def test_rotation_trick_gradient_is_the_rotated_scaled_upstream_gradient():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 6, dtype=torch.float64)
    g = torch.randn(5, 6, dtype=torch.float64)
    out = rotation_trick(x, q)
    assert torch.equal(out.detach(), q)
    (out * g).sum().backward()
    for i in range(5):
        u, v = F.normalize(x[i].detach(), dim=0), F.normalize(q[i], dim=0)
        r = F.normalize(u + v, dim=0)
        rot = torch.eye(6, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(v, u)
        assert torch.allclose(rot @ u, v)  # it really rotates x onto q
        scale = q[i].norm() / x[i].detach().norm()
        torch.testing.assert_close(x.grad[i], scale * rot.t() @ g[i])


def test_straight_through_and_rotation_give_different_gradients():
    torch.manual_seed(0)
    z = torch.randn(1, 64, 8)
    grads = {}
    for est in ("ste", "rotation"):
        torch.manual_seed(1)
        vq = VectorQuantizer(8, 32, estimator=est)
        zz = z.clone().requires_grad_()
        vq(zz).quantized.pow(2).sum().backward()
        grads[est] = zz.grad
    assert not torch.allclose(grads["ste"], grads["rotation"])


@pytest.mark.parametrize("variance", [None, 5e-3])
def test_noise_substitution_moves_each_row_by_its_quantization_error(variance):
    torch.manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(200, 6, dtype=torch.float64, requires_grad=True)
    out = noise_substitution(x, q, variance)
    step = (out - x).detach()
    torch.testing.assert_close(step.norm(dim=1), (x - q).detach().norm(dim=1))
    cos = F.cosine_similarity(step, (q - x).detach(), dim=1)
    if variance is None:  # NSVQ: random directions, not towards q
        assert cos.mean().abs() < 0.15 and cos.min() < 0
    else:  # DiVeQ: towards q, a little off
        assert cos.min() > 0.95 and cos.max() < 1 and not torch.allclose(out, q)
    g = torch.randn(200, 6, dtype=torch.float64)
    (out * g).sum().backward()
    u = F.normalize(step, dim=1)  # the codeword gets the gradient of |q - x| along that direction
    expected_q = (g * u).sum(1, keepdim=True) * F.normalize((q - x).detach(), dim=1)
    torch.testing.assert_close(q.grad, expected_q)
    torch.testing.assert_close(x.grad, g - expected_q)  # and x the rest, with g itself
    # a row already on its codeword passes the gradient on whole and stays finite
    x0, q0 = torch.zeros(1, 6, requires_grad=True), torch.zeros(1, 6, requires_grad=True)
    noise_substitution(x0, q0, variance).sum().backward()
    assert torch.equal(x0.grad, torch.ones(1, 6)) and torch.isfinite(q0.grad).all()


@pytest.mark.parametrize("estimator", ["nsvq", "diveq"])
@pytest.mark.parametrize("learning", ["ema", "loss"])
def test_noise_estimators_train_on_moved_rows_and_code_exactly_outside_training(learning, estimator):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 32, estimator=estimator, learning=learning)
    z = torch.randn(2, 50, 8)
    vq(z)  # (a first step: the restarts of codes its init left dead)
    before = vq.codebook.clone()  # the codewords the step searches (its update moves them after)
    out = vq(z)
    chosen = F.embedding(out.codes, before)
    moved = (out.quantized - z).norm(dim=-1)
    torch.testing.assert_close(moved, (chosen - z).norm(dim=-1))  # each row moved by its error's length
    assert (out.quantized - chosen).norm(dim=-1).mean() > 0.05 * moved.mean()  # but not onto the codeword
    ste = VectorQuantizer(8, 32, learning=learning)
    ste.load_state_dict(vq.state_dict())
    before = ste.codebook.clone()
    out = ste(z)
    assert torch.equal(out.quantized, F.embedding(out.codes, before))  # (the check above tells them apart)
    if learning == "loss":  # the codebook learns through the output's |q - x| alone, no codebook loss needed
        vq.zero_grad()
        vq(z).quantized.square().sum().backward()
        assert vq.embed.grad is not None and vq.embed.grad.abs().sum() > 0
    vq.eval()
    out = vq(z)
    assert torch.equal(out.quantized, vq.decode(out.codes)) and torch.equal(out.codes, vq.encode(z))


@pytest.mark.parametrize("estimator", ["nsvq", "diveq"])
def test_stacks_that_build_on_a_levels_codewords_refuse_noise_estimators(estimator):
    from tokenizers_vq.quantizers import (GroupedQuantizer, HierarchicalQuantizer, MultiScaleResidualQuantizer,  # noqa: PLC0415
                                          ResidualQuantizer, SimVQ)

    noisy = lambda: VectorQuantizer(8, 16, estimator=estimator)  # noqa: E731
    for build in (lambda: ResidualQuantizer([noisy(), VectorQuantizer(8, 16)]),
                  lambda: ResidualQuantizer([SimVQ(8, 16, estimator=estimator)], shared_levels=2),
                  lambda: ResidualQuantizer([GroupedQuantizer([noisy(), noisy()])]),  # (found inside a wrapper too)
                  lambda: MultiScaleResidualQuantizer(8, 16, scales=(1, 2), vq_options={"estimator": estimator}),
                  lambda: HierarchicalQuantizer(noisy(), VectorQuantizer(8, 16))):
        with pytest.raises(ValueError, match=f"estimator='{estimator}'.*give its levels estimator='ste' or 'rotation'"):
            build()
    # the bottom level's output is the stack's output, as a lone quantizer's is: allowed
    out = HierarchicalQuantizer(VectorQuantizer(8, 16), noisy())(torch.randn(2, 4, 4, 8))
    assert out.quantized.shape == (2, 4, 4, 8)


def test_dead_codes_restart_to_distinct_rows_of_the_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 64, dead_code_threshold=1e9)  # every code is dead after the step
    x = torch.randn(100, 8)
    assert vq(x[None]).metrics["restarted"] == 64
    rows = {tuple(r) for r in vq.embed.tolist()}
    assert len(rows) == 64 and rows <= {tuple(r) for r in x.tolist()}  # 64 of the 100, none twice
    vq = VectorQuantizer(8, 64, dead_code_threshold=0.5, decay=0.0)  # dead: the codes this step leaves unused
    vq.embed[::2] = x[30:62]  # every other code sits on a row of the batch (used: alive) ...
    vq.embed[1::2] = 1e3 + torch.arange(32.0)[:, None]  # ... and the others far from every row (dead)
    assert vq(torch.cat([x[30:62], x[62:92]])[None]).metrics["restarted"] == 32
    restarted = {tuple(r) for r in vq.embed[1::2].tolist()}  # the 32 dead ones: 32 rows of the batch, none twice
    assert len(restarted) == 32 and restarted <= {tuple(r) for r in x[30:92].tolist()}
    assert (vq.embed[::2] - x[30:62]).abs().max() < 3  # the live ones: their rows' means, not restarted
    vq = VectorQuantizer(8, 64, dead_code_threshold=1e9)
    vq(x[None, :40])  # fewer rows than dead codes: every row is used, none more than twice
    used = torch.tensor([sum(tuple(e) == tuple(r) for e in vq.embed.tolist()) for r in x[:40].tolist()])
    assert used.min() >= 1 and used.max() <= 2


def test_restart_rows_are_distinct_spread_over_the_batch_and_drawn_anew():
    from tokenizers_vq.distributed import spread_rows  # noqa: PLC0415
    from tokenizers_vq.kernels._host import golden_stride  # noqa: PLC0415

    for n in (1, 2, 3, 7, 64, 100, 1000, 32768, 3 * 5 * 7 * 11 * 13, 2**20):
        assert math.gcd(golden_stride(n), n) == 1 and abs(golden_stride(n) - n / 1.618) < max(30, n / 100), n
        rows = spread_rows(n, torch.arange(2 * n))
        assert sorted(rows[:n].tolist()) == list(range(n)), n  # each row once ...
        assert torch.equal(rows[n:], rows[:n]), n  # ... then the same order again
    rows = spread_rows(1000, torch.arange(12))
    assert (rows.diff().abs() >= 200).all(), rows  # the next restart far from the last (not the neighbouring latent)
    assert len({int(spread_rows(1000, torch.zeros(1, dtype=torch.long))) for _ in range(60)}) > 40  # a new offset each draw


def test_restarts_compile_with_batches_of_several_sizes():
    torch._dynamo.reset()  # (the frame's earlier compilations in this process count towards its limit)
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 64, dead_code_threshold=1.5, check_finite=False).train()
    vq(torch.randn(50, 8))  # the k-means start, eager
    compiled = torch.compile(vq, fullgraph=True, backend="eager")  # a second size traces the count symbolically
    from torch._dynamo.utils import counters  # noqa: PLC0415

    counters.clear()
    for n in (37, 41, 53, 60, 64, 71, 80, 91, 99, 103):  # past the recompile limit (8) had each size its own graph
        assert compiled(torch.randn(n, 8)).codes.shape == (n,)
    assert int(vq.restarts) > 0 and counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_factorised_lookup_uses_a_low_dimensional_codebook():
    vq = VectorQuantizer(64, 128, codebook_dim=8, metric="cosine")
    assert vq.embed.shape == (128, 8)
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(128))
    out = vq(torch.randn(2, 10, 64))
    assert out.quantized.shape == (2, 10, 64)


def test_metrics_report_usage_and_dead_codes():
    vq = VectorQuantizer(4, 64, dead_code_threshold=0.995, restart_dead_codes=False)
    x = torch.randn(1, 2, 4)  # two latents can use at most two codes
    assert vq(x).metrics["dead_codes"] == 0  # counts start at 1: nothing is dead yet
    m = vq(x).metrics  # unused codes' EMA counts are now 0.99, under the threshold
    assert m["usage_batch"] <= 2 / 64
    assert 1.0 <= m["perplexity"] <= 2.0
    assert m["dead_codes"] >= 62 and abs(m["usage_window"] - (1 - m["dead_codes"] / 64)) < 1e-6


def test_encode_never_updates_codebook():
    vq = VectorQuantizer(4, 16, kmeans_init=True)
    vq.train()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.encode(torch.randn(3, 7, 4))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())
    assert vq.training


def test_constructor_rejects_bad_settings():
    for kwargs, msg in [
        ({"metric": "dot"}, "metric"),
        ({"learning": "sgd"}, "learning"),
        ({"estimator": "gumbel"}, "estimator"),
        ({"decay": 1.0}, "decay"),
        ({"codebook_size": 0}, "codebook_size"),
    ]:
        args = {"dim": 4, "codebook_size": 8, **kwargs}
        with pytest.raises(ValueError, match=msg):
            VectorQuantizer(**args)


def test_diversity_loss_is_high_for_one_code_and_low_for_all_codes():
    """``1 - H(mean soft assignment) / log K``: latents all at one codeword score near 1,
    latents spread over every codeword near 0; its gradient reaches the latents."""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, learning="loss", diversity_weight=1.0, diversity_sample=512,
                         diversity_temperature=0.05, dead_code_threshold=0).train()
    cb = vq.codebook.detach()
    one = cb[:1].expand(256, -1).clone()
    spread = cb.repeat(16, 1)
    high, low = vq(one[None]).losses["diversity"], vq(spread[None]).losses["diversity"]
    assert float(high) > 0.9 and float(low) < 0.1
    vq.diversity_temperature = 5.0  # soft enough for a gradient: it moves the latents apart
    near = (one + 0.1 * torch.randn_like(one)).requires_grad_(True)
    vq(near[None]).losses["diversity"].backward()
    assert near.grad is not None and near.grad.abs().sum() > 0
    assert "diversity" not in vq.eval()(spread[None]).losses  # training only


def test_stochastic_sampling_follows_the_temperature_and_eval_stays_nearest():
    torch.manual_seed(0)
    z = torch.randn(1, 2000, 8)
    cold, hot = (VectorQuantizer(8, 32, learning="loss", sample_temperature=t, dead_code_threshold=0) for t in (1e-6, 100.0))
    hot.load_state_dict(cold.state_dict())
    nearest = cold.encode(z)
    assert torch.equal(cold.train()(z).codes, nearest)  # near-zero temperature: the argmin
    hot_codes = hot.train()(z).codes
    assert (hot_codes != nearest).float().mean() > 0.5  # hot: mostly other codes ...
    assert hot_codes.unique().numel() == 32  # ... spread over the whole codebook
    assert torch.equal(hot.eval()(z).codes, nearest)


def test_affine_statistics_keep_the_latents_spread_when_a_step_has_one_row():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 64, learning="loss", affine=True, affine_decay=0.99, dead_code_threshold=0).train()
    for _ in range(1500):  # one row a step (a masked batch with one real position), latents of deviation 2
        vq(2 * torch.randn(1, 4))
    torch.testing.assert_close(vq.latent_var, torch.full((4,), 4.0), atol=1.6, rtol=0)  # its own variance: 0
    torch.testing.assert_close(vq.codebook.std(0), torch.full((4,), 2.0), atol=0.6, rtol=0)


def test_affine_codebook_follows_the_latent_statistics():
    """The effective codebook is the stored one standardised and mapped to the running
    mean and deviation of the latents: after steps on latents of mean 5 and deviation 3
    per channel, the codewords have about those statistics; k-means init keeps its centres."""
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 64, learning="loss", affine=True, affine_decay=0.5, dead_code_threshold=0).train()
    for _ in range(20):
        vq(5 + 3 * torch.randn(1, 512, 4))
    cb = vq.codebook
    torch.testing.assert_close(cb.mean(0), torch.full((4,), 5.0), atol=0.3, rtol=0)
    torch.testing.assert_close(cb.std(0), torch.full((4,), 3.0), atol=0.3, rtol=0)
    km = VectorQuantizer(4, 8, learning="loss", affine=True, kmeans_init=True, affine_decay=0.0).train()
    centres = torch.randn(8, 4) * 10
    x = (centres[:, None] + 0.01 * torch.randn(8, 64, 4)).reshape(1, -1, 4)
    km.affine_decay = 1.0 - 1e-9  # keep the k-means statistics for this check
    km(x)
    torch.testing.assert_close(km.codebook, km.embed.detach(), atol=1e-3, rtol=1e-4)  # the k-means centres
    assert torch.cdist(km.codebook, centres).min(1).values.median() < 0.1
    with pytest.raises(ValueError, match="learned l2 codebook"):
        VectorQuantizer(4, 8, affine=True)
    # a dead-code restart puts the dead codes on latents and moves no other codeword
    before = vq.codebook.detach().clone()
    vq.cluster_size[:5] = 0.0
    vq.dead_code_threshold = 0.5
    x = 5 + 3 * torch.randn(300, 4)
    assert int(vq._restart(x, torch.tensor(True))) == 5
    after = vq.codebook.detach()
    torch.testing.assert_close(after[5:], before[5:])
    assert (after[:5, None] - x[None]).norm(dim=-1).min(1).values.max() < 1e-3


def test_shared_codebook_residual_levels_use_one_codebook():
    from tokenizers_vq.quantizers import ResidualQuantizer

    torch.manual_seed(0)
    rvq = ResidualQuantizer([VectorQuantizer(8, 32)], shared_levels=4)
    assert sum(k.endswith("embed") for k in rvq.state_dict()) == 1
    z = torch.randn(2, 50, 8)
    out = rvq.eval()(z)
    assert out.codes.shape == (2, 50, 4) and rvq.code_shape == (4,)
    cb = rvq.levels[0].codebook
    torch.testing.assert_close(out.quantized, cb[out.codes].sum(-2))  # every level reads the same codebook
    with pytest.raises(ValueError, match="shares one quantizer"):
        ResidualQuantizer([VectorQuantizer(8, 32), VectorQuantizer(8, 32)], shared_levels=2)
    for bad in (True, 2.5, -1):  # not one level, not a count that fails at the first forward
        with pytest.raises(ValueError, match="shared_levels must be a whole number"):
            ResidualQuantizer([VectorQuantizer(8, 32)], shared_levels=bad)
    # the count is kept with the weights: two levels of these codes would decode as other latents
    with pytest.raises(ValueError, match="saved with shared_levels 4 cannot load into a ResidualQuantizer with shared_levels 2"):
        ResidualQuantizer([VectorQuantizer(8, 32)], shared_levels=2).load_state_dict(rvq.state_dict())
    with pytest.raises(ValueError, match="saved with shared_levels 4 cannot load into one of 1 separate levels"):
        ResidualQuantizer([VectorQuantizer(8, 32)]).load_state_dict(rvq.state_dict())


def test_beam_search_lowers_the_residual_error_and_width_one_is_greedy():
    from tokenizers_vq.quantizers import FSQ, ResidualQuantizer

    torch.manual_seed(0)
    levels = [VectorQuantizer(16, 32) for _ in range(4)]
    z = torch.randn(2, 300, 16)
    greedy = ResidualQuantizer(levels).eval()(z)
    err = {b: float((ResidualQuantizer(levels, beam_size=b).eval()(z).quantized - z).square().mean()) for b in (1, 4)}
    assert err[1] == float((greedy.quantized - z).square().mean())
    assert err[4] < 0.9 * err[1]
    beam = ResidualQuantizer(levels, beam_size=4).eval()
    assert torch.equal(beam.decode(beam.encode(z)), beam(z).quantized)
    ref = beam.encode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the search runs in fp32 under autocast too
        assert torch.equal(beam.encode(z), ref)
    assert torch.equal(beam.train()(z).codes, greedy.codes)  # training stays greedy
    with pytest.raises(ValueError, match="candidate codes"):
        ResidualQuantizer([FSQ(16, [5, 5, 5]) for _ in range(2)], beam_size=2)


def test_beam_codes_of_a_shared_codebook_do_not_hang_on_rounding():
    """With one codebook for every level, the same codes in another order leave exactly the
    same error: left to rounding, the beam's choice among them would move with a latent moved by one
    part in 10^7 (another batch, thread count), so one order is given."""
    from tokenizers_vq.quantizers import ResidualQuantizer  # noqa: PLC0415

    torch.manual_seed(0)
    beam = ResidualQuantizer([VectorQuantizer(8, 64)], shared_levels=3, beam_size=4).eval()
    z = torch.randn(1, 20000, 8)
    codes = beam.encode(z)
    assert torch.equal(beam.encode(z * (1 + 1e-7)), codes)
    assert (codes.diff(dim=-1) >= 0).all() and torch.equal(beam.decode(codes), beam(z).quantized)


def test_residual_dropout_leaves_the_deeper_levels_codes_and_statistics_as_without_it():
    """A dropped level still takes its share off the residual: the levels after it code and
    learn from the residuals they see at inference, whatever the dropout."""
    from tokenizers_vq.quantizers import ResidualQuantizer  # noqa: PLC0415

    def stack(dropout: float) -> ResidualQuantizer:
        torch.manual_seed(0)
        levels = [VectorQuantizer(8, 16, kmeans_init=False, dead_code_threshold=0.0) for _ in range(3)]
        return ResidualQuantizer(levels, dropout=dropout).train()

    plain, dropped = stack(0.0), stack(1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        z = torch.randn(16, 10, 8, generator=gen)
        a, b = plain(z), dropped(z)
        assert torch.equal(a.codes, b.codes)
    for p, d in zip(plain.levels, dropped.levels):
        assert torch.equal(p.codebook, d.codebook)
    from tokenizers_vq.quantizers import FSQ  # noqa: PLC0415

    fsq = ResidualQuantizer([FSQ(3, [5, 5, 5]) for _ in range(3)], dropout=1.0).train()
    out = fsq(z[..., :3] * 0.5)  # each item's quantized: the sum of its first n levels, 1 <= n <= 3
    assert torch.equal(out.codes, fsq.eval().encode(z[..., :3] * 0.5))
    parts = [lv.decode(out.codes[..., i]) for i, lv in enumerate(fsq.levels)]
    prefixes = [sum(parts[: n + 1]) for n in range(3)]
    kept = [next(n for n, p in enumerate(prefixes) if torch.allclose(out.quantized[i], p[i], atol=1e-5))
            for i in range(z.shape[0])]
    assert len(set(kept)) > 1  # the items kept prefixes of several lengths


@pytest.mark.parametrize("options", [{}, {"learning": "loss", "affine": True, "metric": "l2"}, {"metric": "cosine"}])
def test_a_batch_with_inf_or_nan_rows_leaves_the_codebook_statistics_as_they_were(options):
    """What the finiteness check does not see (it is off, or skipped under torch.compile)
    must not poison the codebook for good: the step's statistics are skipped."""
    torch.manual_seed(0)
    q = VectorQuantizer(8, 16, kmeans_init=False, check_finite=False, **options).train()
    q(torch.randn(4, 10, 8))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    for bad_value in (float("inf"), float("nan")):
        bad = torch.randn(4, 10, 8)
        bad[0, 3, 2] = bad_value
        out = q(bad)
        assert float(out.metrics["skipped"]) == 1.0
        for k, v in q.state_dict().items():
            if k != "steps":
                assert torch.equal(v, state[k]), k
    out = q(torch.randn(4, 10, 8))
    assert float(out.metrics["skipped"]) == 0.0 and torch.isfinite(q.codebook).all()
    assert not torch.equal(q.state_dict()["cluster_size"], state["cluster_size"])  # it learns again


@pytest.mark.parametrize("kmeans_init", [False, True])
def test_a_projection_that_overflows_half_precision_does_not_poison_the_ema_codebook(kmeans_init):
    torch.manual_seed(0)
    q = VectorQuantizer(64, 256, codebook_dim=8, kmeans_init=kmeans_init).train()
    with torch.autocast("cpu", dtype=torch.float16):
        q(torch.randn(4, 64, 64) * 3e4)  # finite input; its projection overflows fp16
    assert torch.isfinite(q.codebook).all() and torch.isfinite(q.embed_sum).all()
    assert bool(q.initted)  # an init skipped, not poisoned, is given up on: not retried (a resume included)
    q(torch.randn(4, 64, 64))
    assert torch.isfinite(q.codebook).all()


def _prefixes_matching(rq, out) -> torch.Tensor:
    """``(B, *S, L)`` bool: whether a position's quantized is the sum of its first n levels, n = 1..L
    (several n where a level's output is zero)."""
    parts = [lv.decode(out.codes[..., i].clamp_min(0)) for i, lv in enumerate(rq.levels)]
    return torch.stack([(out.quantized - sum(parts[:n])).abs().amax(-1) < 1e-5 for n in range(1, len(parts) + 1)], -1)


def _one_prefix(match: torch.Tensor) -> int | None:
    """The one n that every row of ``match`` ``(M, L)`` allows, if exactly one (else None)."""
    common = match.all(0).nonzero().flatten().tolist()
    return common[0] + 1 if len(common) == 1 else None


def test_residual_dropout_draws_per_item_under_a_mask_and_inside_a_dynamic_quantizer():
    """A masked batch, and a dynamic-length quantizer's region tokens, reach the residual stack
    as one flat row of every item's positions: dropout still keeps one prefix per item (even FSQ
    levels have no zero value, so each prefix sum differs)."""
    from tokenizers_vq.quantizers import DynamicQuantizer, FSQ, ResidualQuantizer  # noqa: PLC0415

    torch.manual_seed(0)
    rq = ResidualQuantizer([FSQ(3, [4, 4, 4]) for _ in range(3)], dropout=1.0).train()
    z = torch.randn(16, 10, 3) * 0.5
    mask = torch.arange(10) < torch.randint(3, 11, (16, 1))
    out = rq(z, mask=mask)
    match = _prefixes_matching(rq, out)
    per_item = [match[i][mask[i]] for i in range(16)]
    assert all(m.all(0).any() for m in per_item)  # one prefix fits each item's every position
    assert len({_one_prefix(m) for m in per_item} - {None}) > 1  # and several across the items

    dq = DynamicQuantizer(ResidualQuantizer([FSQ(3, [4, 4, 4]) for _ in range(3)], dropout=1.0)).train()
    seen = []
    real = dq.inner.forward
    dq.inner.forward = lambda t: seen.append(out := real(t)) or out  # the inner call's own output
    dq(torch.randn(16, 8, 8, 3) * 0.5)
    match = _prefixes_matching(dq.inner, seen[0])[0]  # (M, L): the 16 items' fine rows, then their coarse rows
    fine, coarse = match[: 16 * 64].reshape(16, 64, 3), match[16 * 64 :].reshape(16, 16, 3)
    items = [torch.cat([fine[i], coarse[i]]) for i in range(16)]
    assert all(m.all(0).any() for m in items)
    assert len({_one_prefix(m) for m in items} - {None}) > 1


def test_the_cpu_row_minimum_takes_the_first_index_of_the_least_as_min_does():
    from tokenizers_vq.quantizers._reference import _row_min  # noqa: PLC0415

    torch.manual_seed(0)
    s = torch.randint(0, 4, (64, 512 * 3)).float()  # ties everywhere, within and across runs of 128
    s[3, 700], s[5, :] = -1.0, 2.0
    s[9, 100] = float("nan")
    low, arg = _row_min(s)
    ref_low, ref_arg = s.min(dim=1)
    rows = torch.arange(64) != 9
    assert torch.equal(low[rows], ref_low[rows]) and torch.equal(arg[rows], ref_arg[rows])
    assert low[9].isnan()  # as min: the search then sets NaN aside and looks again


def test_code_statistics_take_any_integer_codes_and_leave_out_codes_out_of_range():
    from tokenizers_vq.quantizers._functional import code_histogram, code_statistics  # noqa: PLC0415

    torch.manual_seed(0)
    x, idx = torch.randn(6, 3), torch.tensor([0, 1, 1, 4, 4, 5])  # 5: out of range for size 5
    counts, sums = code_statistics(x, idx, 5)
    assert counts.tolist() == [1.0, 2.0, 0.0, 0.0, 2.0]
    torch.testing.assert_close(sums[4], x[3] + x[4])
    for dtype in (torch.uint8, torch.int16, torch.int32):
        got = code_statistics(x, idx.to(dtype), 5)
        assert torch.equal(got[0], counts) and torch.equal(got[1], sums)
        assert torch.equal(code_histogram(idx.to(dtype), 5), counts)
    for bad_x, bad_idx in ((x, idx[:5]), (x, idx.reshape(2, 3)), (x[:, 0], idx)):
        with pytest.raises(ValueError, match=r"expected x \(N, d\) and idx \(N,\)"):
            code_statistics(bad_x, bad_idx, 5)
    with pytest.raises(ValueError, match="x on cpu but idx on meta: move both to one device"):
        code_statistics(x, idx.to("meta"), 5)
    with pytest.raises(ValueError, match="x on cpu but codebook on meta: move both to one device"):
        nearest_codes(x, x.to("meta"))
    for call in (lambda: code_histogram(idx, -1), lambda: code_statistics(x, idx, -2)):
        with pytest.raises(ValueError, match="the number of codes must be >= 0"):
            call()


def test_code_counts_stay_exact_past_float32_integers():
    """A code taken by more than 2^24 rows of one batch is counted in integers, then given as the
    nearest fp32 (an fp32 running sum stops at 2^24: 16,777,216 + 1 rounds back)."""
    from tokenizers_vq.quantizers._functional import code_histogram  # noqa: PLC0415

    codes = torch.zeros(2**24 + 1000, dtype=torch.int32)
    codes[-3:] = 1
    assert torch.equal(code_histogram(codes, 2), torch.tensor([2**24 + 997, 3]).float())


def test_the_triton_backend_on_cpu_tensors_is_named_with_the_fix():
    pytest.importorskip("triton")
    from tokenizers_vq.quantizers.kmeans import kmeans  # noqa: PLC0415

    x = torch.randn(20, 4)
    for call in (lambda: nearest_codes(x, x[:5], backend="triton"), lambda: kmeans(x, 3, backend="triton")):
        with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors .* use backend='auto' or 'torch'"):
            call()


def test_kmeans_weights_must_be_one_per_point():
    from tokenizers_vq.quantizers.kmeans import kmeans  # noqa: PLC0415

    x = torch.randn(50, 4)
    for w in (torch.ones(49), torch.ones(1), torch.ones(5, 10)):
        with pytest.raises(ValueError, match=r"kmeans weights must be \(N,\) = \(50,\)"):
            kmeans(x, 3, weights=w)


def test_the_exact_search_finds_the_nearest_code_among_subnormal_distances():
    x = torch.tensor([[-8.795324e-22]])
    c = torch.tensor([[-8.586441e-22], [-8.816514e-22]])  # squared distances 4.4e-46 and 4.5e-48: fp32 subnormals
    assert nearest_codes_reference(x, c, "l2")[1].item() == 1


def _far_from_origin(offset: float = 100.0) -> tuple[VectorQuantizer, torch.Tensor, torch.Tensor]:
    """A codebook and latents around ``offset`` with a spread of 0.1 (their squared norms hold
    few digits of the differences), and the nearest codes by fp64 brute force."""
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 256, learning="loss", restart_dead_codes=False)
    with torch.no_grad():
        vq.embed.copy_(offset + 0.1 * torch.randn(256, 16))
    z = offset + 0.1 * torch.randn(500, 16)
    return vq, z, torch.cdist(z.double(), vq.embed.double()).argmin(1)


def test_candidates_and_sampling_rank_latents_far_from_the_origin_by_their_distance():
    vq, z, nearest = _far_from_origin()
    assert torch.equal(vq.candidates(z, 1)[:, 0], nearest)
    three = vq.candidates(z, 3)
    dist = (z[:, None].double() - vq.embed.double()[three]).square().sum(-1)
    assert (dist.diff(dim=1) >= 0).all()  # nearest first
    vq.sample_temperature = 1e-6  # (almost) no noise: the nearest code
    assert torch.equal(vq.train()(z).codes, nearest)


def test_a_tiny_temperature_samples_the_nearest_code_and_keeps_the_diversity_loss_finite():
    vq, z, nearest = _far_from_origin(0.0)
    vq.sample_temperature, vq.diversity_weight, vq.diversity_temperature = 1e-40, 0.1, 1e-40
    out = vq.train()(z)
    assert torch.equal(out.codes, nearest) and all(torch.isfinite(v) for v in out.losses.values())


def test_candidates_break_exact_ties_to_the_lower_index_in_any_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 64, learning="loss")
    with torch.no_grad():
        vq.embed[40] = vq.embed[7]  # two equal codewords
    z = torch.randn(64, 8)
    z[0] = vq.embed[7] + 1e-3
    assert vq.candidates(z, 2)[0].tolist() == vq.candidates(z[:1], 2)[0].tolist() == [7, 40]
    for bad in (0, 65, 1.5, True):
        with pytest.raises(ValueError, match="k from 1 to the codebook size 64"):
            vq.candidates(z, bad)
    with pytest.raises(ValueError, match=r"latent rows \(n, 8\)"):
        vq.candidates(z[:, :4], 1)


def test_output_is_a_pytree():
    """A quantizer's output flattens to its tensors and back (``make_graphed_callables``, ``tree_map``)."""
    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

    out = VectorQuantizer(dim=8, codebook_size=16).train()(torch.randn(2, 5, 8))
    leaves, spec = tree_flatten(out)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    assert len(leaves) == 2 + len(out.losses) + len(out.metrics)
    back = tree_unflatten(leaves, spec)
    assert type(back) is type(out) and back.quantized is out.quantized and back.losses.keys() == out.losses.keys()
    halved = tree_map(lambda t: t.detach() / 2 if t.is_floating_point() else t, out)
    torch.testing.assert_close(halved.quantized, out.quantized.detach() / 2)


def test_check_finite_refuses_a_cuda_graph_capture(monkeypatch):
    """The finiteness check waits for the GPU; inside a CUDA graph capture it names the fix instead
    (the capture is stood in for here; ``test_gpu_graphed_training_step`` captures for real)."""
    vq = VectorQuantizer(dim=8, codebook_size=16).train()
    z = torch.randn(2, 5, 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(ValueError, match="check_finite=False"):
        vq(z)
    VectorQuantizer(dim=8, codebook_size=16, check_finite=False).train()(z)  # no check: nothing to refuse
