"""VQGAN-LC projected codebook: initialisation paths, training signal, and codebook
utilisation on real photos against a plain VQ-EMA of the same size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from testdata import shared_path
from tokenizers_vq import VectorQuantizer, nearest_codes
from tokenizers_vq.demo import image_to_patches
from tokenizers_vq.io import load_image
from tokenizers_vq.quantizers import ProjectedCodebookVQ
from tokenizers_vq.quantizers.kmeans import kmeans


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


def test_codebook_loss_trains_the_projector_not_the_features():
    torch.manual_seed(0)
    q = ProjectedCodebookVQ(8, 128, features=torch.randn(128, 16))
    out = q(torch.randn(4, 16, 8))
    out.total_loss().backward()
    assert q.projector.weight.grad.abs().sum() > 0
    assert set(out.losses) == {"codebook", "commitment"}
    assert {"perplexity", "usage_batch", "usage_window"} <= set(out.metrics)


def photo_patches(split: str, n_images: int) -> torch.Tensor:
    folder = shared_path("images", "bsds500", split)
    return torch.cat([image_to_patches(load_image(f), 4)[0] for f in sorted(folder.glob("*.jpg"))[:n_images]])


def held_out_usage(q, train: torch.Tensor, val: torch.Tensor, proj: torch.Tensor, steps: int = 300) -> float:
    opt = torch.optim.Adam(q.parameters(), lr=1e-2) if list(q.parameters()) else None
    for _ in range(steps):
        out = q(train[torch.randint(0, len(train), (1024,))] @ proj)
        if opt is not None:
            opt.zero_grad()
            out.total_loss().backward()
            opt.step()
    return q.eval().encode(val @ proj).unique().numel() / q.codebook_size


def test_projected_codebook_keeps_a_large_codebook_in_use_on_real_photos():
    """Latents: a fixed random projection (48 -> 16) of 4x4 RGB patches, the stand-in
    for a frozen encoder. Codebook: k-means (K=4096) of the 48-dim patch features."""
    train, val = photo_patches("train", 20), photo_patches("val", 6)
    k, dim = 4096, 16
    torch.manual_seed(0)
    proj = torch.randn(48, dim, generator=torch.Generator().manual_seed(1)) / 48**0.5
    feats, _ = kmeans(train[torch.randperm(len(train))[: 6 * k]], k, iters=5)
    bound = nearest_codes(val @ proj, feats @ proj)[1].unique().numel() / k  # best linear projector
    torch.manual_seed(0)
    lc = held_out_usage(ProjectedCodebookVQ(dim, k, features=feats), train, val, proj)
    torch.manual_seed(0)
    plain = held_out_usage(VectorQuantizer(dim, k, restart_dead_codes=False), train, val, proj)
    print(f"held-out usage at K={k}: projected (VQGAN-LC) {lc:.1%}, plain VQ-EMA {plain:.1%}, "
          f"k-means codebook through the true projection {bound:.1%}")
    assert lc >= 0.6 and lc >= 0.7 * bound
    assert lc >= 10 * plain


def test_docstring_examples_run():
    import doctest  # noqa: PLC0415

    import tokenizers_vq.quantizers as tq  # noqa: PLC0415
    from tokenizers_vq.quantizers import projected as mod  # noqa: PLC0415

    globs = {"torch": torch, **{n: getattr(tq, n) for n in tq.__all__}}
    result = doctest.testmod(mod, extraglobs=globs, verbose=False)
    assert result.attempted > 0 and result.failed == 0
