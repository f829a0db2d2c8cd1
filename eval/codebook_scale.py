"""Codebook utilisation at 100,000 codes on real photos: the projected codebook of
VQGAN-LC against plain VQ-EMA (issue 5).

Latents are 4x4 RGB patches of real photos (48 values) through a fixed random
projection to ``dim`` (the stand-in for a frozen encoder, as in the CPU test). The
projected codebook's features are the k-means centres of the training patches
(48-dim); only its projector ``48 -> dim`` is trained. Plain VQ-EMA learns its own
codebook: once from random codes with no restarts (the baseline of the paper), once
with k-means initialisation and dead-code restarts (our best non-projected setup).

Utilisation is the fraction of the ``K`` codes that the trained quantizer assigns to at
least one patch of the held-out photos (and, separately, of the training photos). With
``n`` held-out patches, codes used uniformly would give ``1 - exp(-n/K)``: printed as
the ceiling a dataset of this size allows. A second ceiling is the k-means codebook
itself through the true projection (the best a projector can do).

    python -m tokenizers_vq.eval.codebook_scale --train DIR --val DIR [--out DIR]

Writes ``codebook_scale.json`` and ``codebook_scale.md``. Runs on CPU too (slowly).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch


def photo_patches(folder: str | Path, limit: int = 0) -> torch.Tensor:
    from tokenizers_vq.demo import image_to_patches  # noqa: PLC0415
    from tokenizers_vq.io import load_image  # noqa: PLC0415
    from tokenizers_vq.train.data import list_media  # noqa: PLC0415

    files = list_media(folder, "image", limit)
    return torch.cat([image_to_patches(load_image(f), 4)[0] for f in files])


def usage(q, latents: torch.Tensor, batch: int = 1 << 18) -> float:
    """Fraction of codes used at least once on ``latents``."""
    used = torch.zeros(q.codebook_size, dtype=torch.bool, device=latents.device)
    with torch.no_grad():
        for i in range(0, len(latents), batch):
            used[q.encode(latents[i : i + batch])] = True
    return float(used.float().mean())


def train(q, latents: torch.Tensor, steps: int, batch: int, lr: float, seed: int = 0) -> float:
    gen = torch.Generator(device=latents.device).manual_seed(seed)
    params = [p for p in q.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if params else None
    q.train()
    start = time.time()
    for _ in range(steps):
        x = latents[torch.randint(0, len(latents), (batch,), generator=gen, device=latents.device)]
        out = q(x)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            out.total_loss().backward()
            opt.step()
    if latents.is_cuda:
        torch.cuda.synchronize()
    q.eval()
    return time.time() - start


def run(train_dir: str, val_dir: str, k: int = 100_000, dim: int = 16, steps: int = 2000, batch: int = 65536,
        kmeans_iters: int = 10, device: str | None = None, seed: int = 0) -> dict:
    from tokenizers_vq.quantizers import ProjectedCodebookVQ, VectorQuantizer  # noqa: PLC0415
    from tokenizers_vq.quantizers._functional import nearest_codes  # noqa: PLC0415
    from tokenizers_vq.quantizers.kmeans import kmeans  # noqa: PLC0415

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    train_x, val_x = photo_patches(train_dir).to(device), photo_patches(val_dir).to(device)
    proj = (torch.randn(48, dim, generator=torch.Generator().manual_seed(seed + 1)) / 48**0.5).to(device)
    train_z, val_z = train_x @ proj, val_x @ proj
    t0 = time.time()
    feats, _ = kmeans(train_x, k, iters=kmeans_iters, generator=torch.Generator().manual_seed(seed))
    kmeans_s = time.time() - t0
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "k": k, "dim": dim, "steps": steps, "batch": batch,
        "train_patches": len(train_x), "val_patches": len(val_x), "kmeans_seconds": kmeans_s,
        "uniform_ceiling_val": 1 - math.exp(-len(val_x) / k),
        "uniform_ceiling_train": 1 - math.exp(-len(train_x) / k),
        "kmeans_codebook_true_projection": {
            "val": float(nearest_codes(val_z, feats @ proj)[1].unique().numel() / k),
            "train": float(nearest_codes(train_z, feats @ proj)[1].unique().numel() / k),
        },
        "methods": {},
    }
    setups = {
        "projected (VQGAN-LC), linear projector": lambda: ProjectedCodebookVQ(dim, k, features=feats),
        "VQ-EMA, random init, no restarts": lambda: VectorQuantizer(dim, k, restart_dead_codes=False, check_finite=False),
        "VQ-EMA, k-means init + dead-code restarts": lambda: VectorQuantizer(
            dim, k, kmeans_init=True, kmeans_max_samples=4 * k, check_finite=False),
    }
    for name, make in setups.items():
        torch.manual_seed(seed)
        q = make().to(device)
        secs = train(q, train_z, steps, batch, lr=1e-3, seed=seed)
        result["methods"][name] = {"val": usage(q, val_z), "train": usage(q, train_z), "train_seconds": secs,
                                   "ms_per_step": 1000 * secs / steps}
        print(name, json.dumps(result["methods"][name]), flush=True)
    return result


def markdown(r: dict) -> str:
    lines = [
        f"# Codebook utilisation at K = {r['k']:,} ({r['device']}, {r['date']})",
        "",
        f"4x4 RGB patches of real photos through a fixed random projection to {r['dim']} dims; "
        f"{r['train_patches']:,} training patches, {r['val_patches']:,} held-out patches; "
        f"{r['steps']} steps of batch {r['batch']:,}. Usage = share of the {r['k']:,} codes assigned to at least one patch.",
        "",
        "| quantizer | held-out usage | training-set usage | ms/step |",
        "|---|---|---|---|",
    ]
    for name, m in r["methods"].items():
        lines.append(f"| {name} | {m['val']:.1%} | {m['train']:.1%} | {m['ms_per_step']:.2f} |")
    c = r["kmeans_codebook_true_projection"]
    lines += [
        f"| ceiling: the k-means codebook through the true projection | {c['val']:.1%} | {c['train']:.1%} | |",
        f"| ceiling: codes used uniformly, 1 - exp(-n/K) | {r['uniform_ceiling_val']:.1%} | {r['uniform_ceiling_train']:.1%} | |",
        "",
        f"k-means of the training patches into {r['k']:,} centres took {r['kmeans_seconds']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="folder of training photos")
    p.add_argument("--val", required=True, help="folder of held-out photos")
    p.add_argument("--out", default=os.environ.get("OUT", "results_tmp"))
    p.add_argument("--k", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    r = run(args.train, args.val, args.k, args.dim, args.steps, args.batch, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codebook_scale.json").write_text(json.dumps(r, indent=1))
    md = markdown(r)
    (out / "codebook_scale.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
