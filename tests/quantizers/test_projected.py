"""VQGAN-LC projected codebook: initialisation paths, training signal, and codebook
utilisation on real photos against a plain VQ-EMA of the same size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from testdata import shared_path
from tokenizers_vq import VectorQuantizer, nearest_codes
from tokenizers_vq.eval.codebook_scale import photo_patches, run, train, usage
from tokenizers_vq.quantizers import ProjectedCodebookVQ
from tokenizers_vq.quantizers.kmeans import kmeans
from tokenizers_vq.quantizers.projected import fit_linear_projector


def test_features_from_tensor_file_and_kmeans(tmp_path):
    torch.manual_seed(0)
    feats = torch.randn(300, 24)
    exact = ProjectedCodebookVQ(8, 300, features=feats)
    assert torch.equal(exact.features, feats) and exact.codebook.shape == (300, 8)
    assert "features" not in dict(exact.named_parameters())  # frozen
    save_file({"clip": feats}, tmp_path / "f.safetensors")
    clustered = ProjectedCodebookVQ(8, 64, features=tmp_path / "f.safetensors", kmeans_iters=3)
    assert clustered.features.shape == (64, 24)
    with pytest.raises(ValueError, match="cannot initialise"):
        ProjectedCodebookVQ(8, 301, features=feats)
    save_file({"a": feats, "b": feats.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="feature_key"):
        ProjectedCodebookVQ(8, 64, features=tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="no tensor 'c'"):
        ProjectedCodebookVQ(8, 64, features=tmp_path / "two.safetensors", feature_key="c")
    import numpy as np  # noqa: PLC0415

    np.save(tmp_path / "f.npy", feats.numpy())  # another format, a cut copy, none at all: named, with the format
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "f.safetensors").read_bytes()[:100])
    for name in ("f.npy", "cut.safetensors", "absent.safetensors"):
        with pytest.raises(ValueError, match=f"codebook features .*{name}: not a readable safetensors file"):
            ProjectedCodebookVQ(8, 64, features=tmp_path / name)


def test_self_initialisation_from_own_latents_is_bounded_and_kmeans():
    torch.manual_seed(0)
    q = ProjectedCodebookVQ(4, 32, init_samples=256, init_batches=4, kmeans_iters=5)
    centres = torch.randn(32, 4) * 5
    data = centres[torch.randint(0, 32, (4000,))] + 0.01 * torch.randn(4000, 4)
    before = nearest_codes(data, q.codebook.detach())[0].mean()
    for step in range(4):
        assert not q._initted
        q(data[step * 500 : (step + 1) * 500])
        assert sum(p.shape[0] for p in q._pool) <= 256  # bounded memory
    assert q._initted and bool(q.initted)
    # identity projector at F == D: the codebook is now k-means of the collected latents
    after = nearest_codes(data, q.codebook.detach())[0].mean()
    assert after < 0.1 * before
    assert torch.equal(q.codebook.detach(), q.features)


def test_self_initialisation_leaves_out_non_finite_latents_and_waits_for_distinct_ones():
    """A non-finite latent in the init window would make a non-finite feature (every later
    projector gradient NaN); latents all alike would make every feature the same (no restart
    parts them): the pool leaves the one out and waits for distinct ones."""
    torch.manual_seed(3)
    q = ProjectedCodebookVQ(4, 8, init_samples=32, init_batches=1, check_finite=False).train()
    x = torch.randn(1, 32, 4)
    x[0, 3, 0] = float("inf")
    q(x)
    assert q._initted and torch.isfinite(q.features).all()
    q(torch.randn(1, 256, 4)).losses["codebook"].backward()
    assert torch.isfinite(q.projector.weight.grad).all()
    alike = ProjectedCodebookVQ(4, 8, init_samples=16, init_batches=1).train()
    alike(torch.zeros(1, 32, 4))  # an encoder whose last layer starts at zero
    assert not alike._initted and alike._pool == []  # collects afresh
    alike(torch.randn(1, 32, 4))
    assert alike._initted and torch.unique(alike.features, dim=0).shape[0] == 8


def test_codebook_loss_trains_the_projector_not_the_features():
    torch.manual_seed(0)
    q = ProjectedCodebookVQ(8, 128, features=torch.randn(128, 16))
    out = q(torch.randn(4, 16, 8))
    out.total_loss().backward()
    assert q.projector.weight.grad.abs().sum() > 0
    assert set(out.losses) == {"codebook", "commitment"}
    assert {"perplexity", "usage_batch", "usage_window"} <= set(out.metrics)


def test_projector_fit_registers_the_codebook_onto_the_latents():
    """Features: samples of 12 unequal clusters in 6 dims; latents: other samples through
    an unknown affine map to 3 dims. The fit (no correspondences) lands near that map;
    the paper's training from a random projector does not. In the quantizer it runs
    once, after ``init_batches`` training batches."""
    g = torch.Generator().manual_seed(3)
    centres, weights = torch.randn(12, 6, generator=g) * 4, torch.rand(12, generator=g) + 0.2

    def sample(n: int) -> torch.Tensor:
        return centres[torch.multinomial(weights, n, replacement=True, generator=g)] + torch.randn(n, 6, generator=g)

    feats, a, c = sample(512), torch.randn(3, 6, generator=g), torch.randn(3, generator=g) * 3
    z = sample(4096) @ a.T + c
    truth = nearest_codes(z, feats @ a.T + c)[0].mean()

    def distortion_and_usage(codebook: torch.Tensor) -> tuple[float, float]:
        dist, idx = nearest_codes(z, codebook.detach())
        return float(dist.mean() / truth), idx.unique().numel() / 512

    torch.manual_seed(0)
    w, b = fit_linear_projector(feats, z[:1024])
    fitted = distortion_and_usage(feats @ w.T + b)
    q = ProjectedCodebookVQ(3, 512, features=feats, init_samples=1024, init_batches=4)
    for step in range(4):
        assert not q._initted
        q(z[step * 256 : (step + 1) * 256])
    assert q._initted and bool(q.initted)
    in_module = distortion_and_usage(q.codebook)
    rand = ProjectedCodebookVQ(3, 512, features=feats, fit_projector=False)
    assert rand._initted
    opt = torch.optim.Adam(rand.parameters(), lr=1e-2)
    for _ in range(200):
        out = rand(z[torch.randint(0, len(z), (512,))])
        opt.zero_grad()
        out.total_loss().backward()
        opt.step()
    trained = distortion_and_usage(rand.codebook)
    print(f"distortion / true map's, usage: fit {fitted}, fit in the quantizer {in_module}, "
          f"paper's training from a random projector {trained}")
    assert fitted[0] < 1.6 and in_module[0] < 1.6 and trained[0] > 2 * fitted[0]
    assert fitted[1] > 0.75 and in_module[1] > 0.75 and fitted[1] > trained[1] + 0.15
    assert fit_linear_projector(feats, torch.zeros(64, 3)) is None  # nothing to fit to


def test_fit_keeps_the_contract_and_waits_for_latents_with_spread():
    torch.manual_seed(0)
    feats = torch.randn(256, 24)
    q = ProjectedCodebookVQ(16, 64, features=feats, init_batches=1, kmeans_iters=3)
    q(torch.zeros(4, 32, 16))  # nothing to fit to: keeps collecting
    assert not q._initted
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(1e4 * torch.randn(4, 32, 16))
    assert q._initted and torch.isfinite(q.projector.weight).all() and torch.isfinite(out.quantized).all()
    twin = ProjectedCodebookVQ(16, 64, features=feats, init_batches=1, kmeans_iters=3)
    twin.load_state_dict(q.state_dict())
    z = 1e4 * torch.randn(3, 11, 16)
    assert twin._initted and torch.equal(twin.eval().encode(z), q.eval().encode(z))
    assert torch.equal(q.decode(q.encode(z)), q(z).quantized)


def test_projected_codebook_keeps_a_large_codebook_in_use_on_real_photos():
    """Latents: a fixed random projection (48 -> 16) of 4x4 RGB patches, the stand-in
    for a frozen encoder (the benchmark ``eval/codebook_scale.py`` at a CPU size).
    Codebook: k-means (K=4096) of the 48-dim patch features. The fitted projector
    reaches the usage of the true projection (88%); from a random init the same
    training gave 57-84% depending on the seed."""
    folder = shared_path("images", "bsds500")
    train_x, val_x = photo_patches(folder / "train", 20), photo_patches(folder / "val", 6)
    k, dim = 4096, 16
    torch.manual_seed(0)
    proj = torch.randn(48, dim, generator=torch.Generator().manual_seed(1)) / 48**0.5
    feats, _ = kmeans(train_x[torch.randperm(len(train_x))[: 6 * k]], k, iters=5)
    train_z, val_z = train_x @ proj, val_x @ proj
    bound = nearest_codes(val_z, feats @ proj)[1].unique().numel() / k  # the true projection
    found = []
    for make in (lambda: ProjectedCodebookVQ(dim, k, features=feats, init_samples=8192),
                 lambda: VectorQuantizer(dim, k, restart_dead_codes=False)):
        torch.manual_seed(0)
        q = make()
        train(q, train_z, steps=150, batch=1024, lr=1e-3)
        found.append(usage(q, val_z))
    lc, plain = found
    print(f"held-out usage at K={k}: projected (VQGAN-LC) {lc:.1%}, plain VQ-EMA {plain:.1%}, "
          f"k-means codebook through the true projection {bound:.1%}")
    assert lc >= 0.8 and lc >= 0.93 * bound
    assert lc >= 10 * plain


def test_benchmark_runs_both_encoders_end_to_end(tmp_path):
    """``eval/codebook_scale.py`` at a toy size: the trainable-encoder setups write their
    rows (with the dense held-out usage), and a later frozen-encoder run on the same
    data adds its rows beside them."""
    folder = shared_path("images", "bsds500")
    small = {"k": 64, "steps": 3, "batch": 512, "trainable_steps": 10, "trainable_batch": 512, "kmeans_iters": 2,
             "train_images": 1, "val_images": 1, "dense_stride": 2, "device": "cpu", "out": tmp_path}
    first = run(folder / "train", folder / "val", encoder="trainable", **small)["methods"]
    trainable = first["trainable encoder + projected (VQGAN-LC)"]
    assert len(first) == 2 and trainable["steps"] == 10 and 0 < trainable["val_mse"] < 1
    both = run(folder / "train", folder / "val", encoder="frozen", **small)["methods"]
    assert len(both) == 6 and both["trainable encoder + projected (VQGAN-LC)"] == trainable
    assert "projected (VQGAN-LC), balanced k-means features (0.25)" in both
    assert all(0 < m["val"] <= m["val_dense"] <= 1 for m in both.values())
    table = (tmp_path / "codebook_scale.md").read_text()
    assert all(f"| {name} |" in table for name in both)
    assert "| ceiling (frozen encoder): the balanced k-means codebook (0.25) through the true projection |" in table


def test_balanced_kmeans_evens_out_cluster_sizes():
    """A dense blob and a small far one: plain k-means leaves clusters far under the mean
    size; ``balance`` re-seeds them inside big clusters until none is under the threshold,
    at a quantisation error close to plain k-means'."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000, 4), torch.randn(300, 4) * 0.05 + 8])
    plain, n_plain = kmeans(x, 256, iters=10, generator=torch.Generator().manual_seed(0))
    even, n_even = kmeans(x, 256, iters=10, generator=torch.Generator().manual_seed(0), balance=0.25)
    assert (n_plain < 0.25 * n_plain.mean()).any()
    assert (n_even >= 0.25 * n_even.mean()).all() and n_even.sum() == len(x)
    err_plain, err_even = nearest_codes(x, plain)[0].mean(), nearest_codes(x, even)[0].mean()
    assert err_even < 1.2 * err_plain, (err_even, err_plain)  # still a good quantizer of x


def test_features_without_spread_or_past_the_magnitude_limit_are_refused_and_no_fit_is_non_finite():
    """The projector fit divides by the features' spread (constant ones would give a NaN codebook
    after the first batches): refused when it fits (a model being loaded builds with placeholders
    its weights fill); and sums their squares (features of magnitude 1e30 overflow them)."""
    for feats in (torch.ones(64, 6), torch.zeros(64, 6), torch.full((64, 6), 3.0) + 1e-7 * torch.randn(64, 6)):
        q = ProjectedCodebookVQ(8, 16, features=feats, init_samples=32, init_batches=1)
        with pytest.raises(ValueError, match=r"codebook features have no spread .* features=None"):
            q.train()(torch.randn(40, 8))
    with pytest.raises(ValueError, match=r"magnitude [0-9.]+e\+30, over the limit of 1e\+15: scale them down"):
        ProjectedCodebookVQ(8, 16, features=torch.randn(64, 6, generator=torch.Generator().manual_seed(0)) * 1e30)
    assert fit_linear_projector(torch.ones(64, 6), torch.randn(200, 8)) is None  # not a NaN map
    q = ProjectedCodebookVQ(8, 16, features=torch.randn(64, 6), init_samples=32, init_batches=1, kmeans_iters=2)
    q.train()(torch.randn(40, 8))
    assert q._initted and torch.isfinite(q.codebook).all()
    with pytest.raises(ValueError, match=r"codebook_size must be a whole number in \[1, inf\), got 2.5"):
        ProjectedCodebookVQ(8, 2.5, features=torch.randn(4, 8))


def test_principal_axes_of_features_far_from_the_origin_keep_their_variances():
    """Features at 1e4 with spreads of 0.01 to 1: the fp64 covariance's eigenvalues, to 0.1%
    (second moments about the origin would leave only rounding there)."""
    from tokenizers_vq.quantizers.projected import _principal_axes  # noqa: PLC0415

    torch.manual_seed(0)
    x = 1e4 + torch.randn(4000, 8) * torch.linspace(0.01, 1, 8)
    mean, var, axes, _ = _principal_axes(x, False)
    ref = torch.linalg.eigvalsh(torch.cov(x.double().T, correction=0)).flip(0)
    torch.testing.assert_close(var.double(), ref, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(mean.double(), x.double().mean(0), rtol=1e-6, atol=0)
