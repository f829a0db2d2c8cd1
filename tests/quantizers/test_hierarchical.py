"""Two-level hierarchical quantizer: per-level codes, gradients into both levels, and
both levels in use on real photos (2D) and speech (1D)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from testdata import shared_path
from tokenizers_vq import FSQ, VectorQuantizer
from tokenizers_vq.demo import image_to_patches
from tokenizers_vq.media import load_image
from tokenizers_vq.quantizers import HierarchicalQuantizer

D = 16


def make(k: int = 64) -> HierarchicalQuantizer:
    torch.manual_seed(0)
    return HierarchicalQuantizer(VectorQuantizer(D, k, learning="loss"), VectorQuantizer(D, k, learning="loss"))


@pytest.mark.parametrize("lead", [(2, 9), (2, 6, 7)])
def test_levels_shapes_and_gradients_reach_both_levels(lead):
    hq = make()
    encoder = torch.nn.Linear(D, D)
    z = encoder(torch.randn(*lead, D))
    out = hq(z)
    top_shape = (lead[0], *(-(-s // 2) for s in lead[1:]))
    assert out.codes_per_level["top"].shape == top_shape
    assert out.codes_per_level["bottom"].shape == lead
    (out.quantized.square().sum() + out.total_loss()).backward()
    for name, p in [("top_in", hq.top_in.weight), ("fuse", hq.fuse.weight), ("top codebook", hq.top.embed),
                    ("bottom codebook", hq.bottom.embed), ("encoder", encoder.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    hq.eval()
    with torch.no_grad():
        levels = hq.encode_levels(z)
        assert torch.equal(hq.decode_levels(levels["top"], levels["bottom"]), hq(z).quantized)
        assert torch.equal(hq.encode(z)[..., 0][(slice(None),) + (slice(None, None, 2),) * (len(lead) - 1)], levels["top"])


def test_per_level_decode_validates_shapes():
    hq = make().eval()
    levels = hq.encode_levels(torch.randn(2, 8, 8, D))
    with pytest.raises(ValueError, match="top codes must be"):
        hq.decode_levels(levels["top"][:, :3], levels["bottom"])
    with pytest.raises(ValueError, match="at least one spatial axis"):
        hq(torch.randn(4, D))
    with pytest.raises(ValueError, match="share codebook_size"):
        HierarchicalQuantizer(VectorQuantizer(D, 64), FSQ(D, [5, 5, 5]))


def train_and_measure(z_train: torch.Tensor, z_val: torch.Tensor, steps: int = 120) -> dict[str, float]:
    torch.manual_seed(0)
    hq = HierarchicalQuantizer(VectorQuantizer(D, 256, kmeans_init=True), VectorQuantizer(D, 256, kmeans_init=True))
    opt = torch.optim.Adam(hq.parameters(), lr=1e-3)
    for _ in range(steps):
        z = z_train[torch.randint(0, len(z_train), (16,))]
        out = hq(z)
        loss = F.mse_loss(out.quantized, z) + out.total_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hq.eval()
    with torch.no_grad():
        levels = hq.encode_levels(z_val)
        full = F.mse_loss(hq(z_val).quantized, z_val)
        # knock out one level: all its codes replaced by its most common code
        top, bottom = levels["top"], levels["bottom"]
        no_bottom = torch.full_like(bottom, int(bottom.flatten().mode().values))
        no_top = torch.full_like(top, int(top.flatten().mode().values))
        without_bottom = F.mse_loss(hq.decode_levels(top, no_bottom), z_val)
        without_top = F.mse_loss(hq.decode_levels(no_top, bottom), z_val)
    return {
        "top_usage": top.unique().numel() / 256,
        "bottom_usage": bottom.unique().numel() / 256,
        "mse": float(full),
        "mse_without_bottom": float(without_bottom),
        "mse_without_top": float(without_top),
    }


def check_both_levels_used(m: dict[str, float], what: str) -> None:
    print(f"{what}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    assert m["top_usage"] > 0.2 and m["bottom_usage"] > 0.2
    # knocking out either level costs at least a quarter more error: both carry information
    assert 1.25 * m["mse"] < min(m["mse_without_bottom"], m["mse_without_top"])


def test_both_levels_used_on_real_photos_2d():
    folder = shared_path("images", "bsds500")
    proj = torch.randn(48, D, generator=torch.Generator().manual_seed(0)) / 48**0.5

    def grids(split: str, n: int) -> torch.Tensor:
        out = []
        for f in sorted((folder / split).glob("*.jpg"))[:n]:
            p, _ = image_to_patches(load_image(f)[:, :320, :320], 4)  # (80*80, 48)
            g = (p @ proj).reshape(5, 16, 5, 16, D).permute(0, 2, 1, 3, 4).reshape(25, 16, 16, D)
            out.append(g)
        return torch.cat(out)

    check_both_levels_used(train_and_measure(grids("train", 20), grids("val", 6)), "2D photos")


def test_both_levels_used_on_real_speech_1d():
    import soundfile as sf  # noqa: PLC0415

    files = sorted(shared_path("audio", "fsdd").glob("*.wav"))
    proj = torch.randn(32, D, generator=torch.Generator().manual_seed(0)) / 32**0.5

    def frames(sel) -> torch.Tensor:
        out = []
        for f in sel:
            w = torch.from_numpy(sf.read(f, dtype="float32")[0])
            w = w / w.abs().max().clamp_min(1e-6)
            n = len(w) // (32 * 64) * (32 * 64)
            if n:
                out.append((w[:n].reshape(-1, 64, 32) @ proj))  # 64 frames of 32 samples each
        return torch.cat(out)

    check_both_levels_used(train_and_measure(frames(files[:200]), frames(files[-60:])), "1D speech")


@pytest.mark.parametrize("grid", [(16, 16), (5, 7), (9,)])
def test_tokens_counted_are_the_compact_codes_of_both_levels(grid):
    """A bitrate counts the coarse grid's top codes once, not as repeated over each 2-block in ``codes``."""
    hq = HierarchicalQuantizer(VectorQuantizer(8, 16), VectorQuantizer(8, 16)).eval()
    levels = hq.encode_levels(torch.randn(1, *grid, 8))
    assert hq.num_tokens(grid) == sum(codes.numel() for codes in levels.values()) < 2 * torch.Size(grid).numel()
