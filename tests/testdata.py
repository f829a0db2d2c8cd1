"""Test data: where the real media lives (``$TVQ_TEST_DATA``, default ../shared/data),
how to skip without it, small copies of it, and random weight files in the layouts of
published ones (none can be downloaded here)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vq.lpips import BACKBONE_FILES
from tokenizers_vq.media import load_image, save_image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TVQ_TEST_DATA") or REPO.parent / "shared" / "data")

# torchvision ``features.{i}.weight`` shapes (convs only; biases are (out,); VGG kernels 3x3)
LPIPS_CONVS = {
    "alex": {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)},
    "vgg": dict(zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
                    [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
                     (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)])),
}
LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def shared_path(*parts: str) -> Path:
    """A path under :data:`SHARED_DATA`; skips the test (with the reason) when absent, or
    fails it when ``$TVQ_REQUIRE_DATA`` is set (as CI does)."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists() and os.environ.get("TVQ_REQUIRE_DATA"):
        pytest.fail(f"real test data not found at {p}: set TVQ_TEST_DATA to the shared data folder")
    if not p.exists():
        pytest.skip(f"real test data not found at {p} ($TVQ_TEST_DATA, default the ../shared/data folder beside the repo)")
    return p


def interrupt_at_call(monkeypatch, module, name: str, n: int) -> list:
    """``module.name`` replaced by one that raises KeyboardInterrupt at its ``n``-th call (a
    Ctrl-C part-way through a run) and calls the original before; returns the list its calls
    are counted in."""
    real, calls = getattr(module, name), []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(module, name, interrupted)
    return calls


def small_photos(folder: Path, n: int, side: int = 64) -> list[Path]:
    """The first ``n`` real BSDS validation photos scaled to ``side`` x ``side`` pixels,
    written as PNGs into ``folder`` (created); sorted paths. Small inputs keep tests fast."""
    folder.mkdir(parents=True)
    for p in sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:n]:
        save_image(F.interpolate(load_image(p)[None], size=(side, side), mode="area")[0], folder / f"{p.stem}.png")
    return sorted(folder.iterdir())


def torchvision_state(net: str) -> dict[str, torch.Tensor]:
    """A random torchvision AlexNet / VGG16 state dict (He-initialised convs, so
    activations keep their scale), from the global torch RNG."""
    state = {}
    for i, shape in LPIPS_CONVS[net].items():
        shape = shape if len(shape) == 4 else (*shape, 3, 3)
        state[f"features.{i}.weight"] = torch.randn(shape) * math.sqrt(2 / math.prod(shape[1:]))
        state[f"features.{i}.bias"] = torch.randn(shape[0]) * 0.01
    state["classifier.1.weight"] = torch.randn(16, 8)  # the classifier is not LPIPS's; ignored
    return state


def lpips_heads(net: str) -> dict[str, torch.Tensor]:
    """Random non-negative lpips v0.1 linear heads (``lin{k}.model.1.weight``)."""
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS[net])}


def lpips_files(folder: Path, net: str) -> tuple[Path, Path]:
    """Write a random torchvision backbone file and lpips heads file for ``net`` into
    ``folder`` under their published names; returns ``(backbone, heads)``."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone, heads = folder / BACKBONE_FILES[net], folder / f"{net}.pth"
    torch.save(torchvision_state(net), backbone)
    torch.save(lpips_heads(net), heads)
    return backbone, heads
