"""VQ-EMA on real photos: dead-code restarts keep a 1024-code book in use."""

from __future__ import annotations

import torch

from testdata import shared_path
from tokenizers_vq import VectorQuantizer
from tokenizers_vq.demo import image_to_patches
from tokenizers_vq.media import load_image


def photo_patches(split: str, n_images: int) -> torch.Tensor:
    """4x4 RGB patches (48-dim, latent-sized) of the first BSDS500 photos of a split."""
    folder = shared_path("images", "bsds500", split)
    files = sorted(folder.glob("*.jpg"))[:n_images]
    return torch.cat([image_to_patches(load_image(f), 4)[0] for f in files])


def held_out_usage(restart: bool, train: torch.Tensor, val: torch.Tensor, steps: int = 300) -> float:
    torch.manual_seed(0)
    vq = VectorQuantizer(48, 1024, restart_dead_codes=restart, dead_code_threshold=1.0)
    for _ in range(steps):
        vq(train[torch.randint(0, len(train), (2048,))])
    return vq.encode(val).unique().numel() / 1024


def test_dead_code_restart_keeps_the_codebook_in_use_on_real_photos():
    train, val = photo_patches("train", 100), photo_patches("val", 30)
    with_restart = held_out_usage(True, train, val)
    without = held_out_usage(False, train, val)
    print(f"held-out codebook usage at K=1024: with restart {with_restart:.1%}, without {without:.1%}")
    assert with_restart >= 0.95
    assert without < 0.5 * with_restart  # random init without restarts leaves most codes dead
