"""``tvq demo``: quantizers fitted to the patches of one real photo.

Until a trained tokenizer ships, this is the main job: it shows each quantizer's
codes, reconstruction, bitrate and codebook usage on real pixels, on CPU, in
seconds. Writes ``reconstruction.png``, ``codebook_usage.png`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenizers_vq.io import atomic_write, check_can_write

from tokenizers_vq.media import bundled_photo, load_image
from tokenizers_vq.quantizers import FSQ, Quantizer, ResidualQuantizer, VectorQuantizer
from tokenizers_vq.quantizers._functional import code_histogram
from tokenizers_vq.viz import image_row, usage_plot


def image_to_patches(img: torch.Tensor, p: int, stride: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(3, H, W)`` in [0, 1] -> ``(N, 3*p*p)`` in [-1, 1], row by row, and the size
    ``(h, w)`` cropped to a multiple of ``p`` that :func:`patches_to_image` rebuilds.
    ``stride < p`` gives overlapping windows (not invertible by ``patches_to_image``)."""
    s = stride or p
    patches = (img * 2 - 1).unfold(1, p, s).unfold(2, p, s)  # (3, rows, cols, p, p)
    return patches.permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p), (img.shape[1] // p * p, img.shape[2] // p * p)


def patches_to_image(patches: torch.Tensor, hw: tuple[int, int], p: int) -> torch.Tensor:
    h, w = hw
    x = patches.reshape(h // p, w // p, 3, p, p).permute(2, 0, 3, 1, 4).reshape(3, h, w)
    return ((x + 1) / 2).clamp(0, 1)


def demo_quantizers(dim: int) -> dict[str, Quantizer]:
    return {
        "vq-ema 1024": VectorQuantizer(dim, 1024, kmeans_init=True),
        "rvq 4x256": ResidualQuantizer([VectorQuantizer(dim, 256, kmeans_init=True) for _ in range(4)]),
        "fsq 8.8.8.5.5.5": FSQ(dim, [8, 8, 8, 5, 5, 5]),
    }


def fit(q: Quantizer, data: torch.Tensor, steps: int, batch: int, desc: str) -> None:
    """Train ``q`` to reconstruct ``data`` (EMA codebooks update in forward; any
    parameters, e.g. projections, by Adam on MSE plus the quantizer's own losses)."""
    params = [p for p in q.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3) if params else None
    q.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        x = data[torch.randint(0, data.shape[0], (batch,))]
        out = q(x)
        loss = F.mse_loss(out.quantized, x) + out.total_loss()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    q.eval()


def run_demo(
    image: str | os.PathLike | None = None, out_dir: str | os.PathLike = "tvq_demo", steps: int = 300, patch: int = 4
) -> dict[str, dict[str, float]]:
    """Fit each demo quantizer to the photo's ``patch x patch`` patches and report.

    Returns:
        ``{quantizer name: {"psnr_db", "bits_per_pixel", "usage", ...}}``, also
        written to ``out_dir/metrics.json``.
    """
    if patch < 1 or steps < 1:
        raise ValueError(f"patch={patch}, steps={steps}: both must be whole numbers >= 1")
    check_can_write(Path(out_dir) / "metrics.json")  # refused now, not after the training
    torch.manual_seed(0)
    path = Path(image) if image is not None else bundled_photo()
    img = load_image(path)
    if min(img.shape[1:]) < patch:
        raise ValueError(f"image {path} is {img.shape[2]}x{img.shape[1]}, smaller than one {patch}x{patch} patch")
    data, hw = image_to_patches(img, patch)
    out_dir = Path(out_dir)
    results: dict[str, dict[str, float]] = {}
    recons, usage = [patches_to_image(data, hw, patch)], {}
    for name, q in demo_quantizers(data.shape[1]).items():
        fit(q, data, steps, batch=min(4096, data.shape[0]), desc=name)
        with torch.no_grad():
            codes = q.encode(data)
            rec = q.decode(codes).float()
        mse = F.mse_loss((rec + 1) / 2, (data + 1) / 2).item()
        counts = torch.stack([code_histogram(c, q.codebook_size) for c in codes.reshape(len(data), -1).t()])
        bits = q.num_codebooks * math.log2(q.codebook_size)
        results[name] = {
            "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "bits_per_pixel": bits / patch**2,
            "tokens_per_image": float(codes.numel()),
            "usage": (counts > 0).float().mean().item(),
        }
        recons.append(patches_to_image(rec, hw, patch))
        usage[name] = counts.sum(0) if counts.shape[0] == 1 else counts[0]
    image_row(recons, out_dir / "reconstruction.png")
    usage_plot(usage, out_dir / "codebook_usage.png", title=f"codebook usage on {path.name}")
    report = {"image": str(path), "patch": patch, "steps": steps, "results": results}
    atomic_write(out_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return results
