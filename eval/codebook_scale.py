"""Codebook utilisation at 100,000 codes on real photos: the projected codebook of
VQGAN-LC against plain VQ-EMA.

Data: 4x4 RGB patches of real photos (48 values). The projected codebook's features
are the k-means centres of the training patches (48-dim); only its projector
``48 -> dim`` is trained. Plain VQ-EMA learns its own codebook: once from random
codes with no restarts (the baseline of the paper), once with k-means initialisation
and dead-code restarts (our best non-projected setup). Two encoders (``--encoder``):

* ``frozen``: latents are the patches through a fixed random projection to ``dim``
  (the stand-in for a frozen encoder, as in the CPU test); only the quantizer trains.
* ``trainable``: the encoder starts as that projection plus a zero-initialised MLP
  branch and trains jointly with the quantizer and an MLP decoder on the patches'
  MSE (:class:`PatchAutoencoder`), as in VQGAN-LC, where latents can move (on CPU
  at K = 4,096 this lowered held-out usage: ``eval/results/codebook_scale_cpu_study.md``).

Utilisation is the fraction of the ``K`` codes that the trained quantizer assigns to at
least one patch of the held-out photos (and, separately, of the training photos). With
``n`` held-out patches, codes used uniformly would give ``1 - exp(-n/K)``: printed as
the ceiling a dataset of this size allows. A second ceiling is the k-means codebook
itself through the true projection (the best a projector of frozen latents can do).
VQGAN-LC counts the codes used by all tokens of the ImageNet val set, about 128 tokens
per code at K = 100,000; the held-out patches give 9.6 per code here, so a "dense"
usage is also measured over all 4x4 windows of the held-out photos (stride 1: about
150 per code).

    python -m tokenizers_vq.eval.codebook_scale --train DIR --val DIR [--encoder both] [--out DIR]

Writes ``codebook_scale.json`` and ``codebook_scale.md`` after each setup, keeping the
rows of an earlier run in ``--out`` that measured the same data on the same device.
Runs on CPU too (slowly; ``--train-images``/``--val-images`` take the first photos).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Encoder = Literal["frozen", "trainable", "both"]
ENCODERS = ("frozen", "trainable", "both")


def photo_patches(folder: str | Path, limit: int = 0, stride: int = 4) -> torch.Tensor:
    """``(N, 48)`` 4x4 RGB patches in [-1, 1] of the photos in ``folder`` (the first
    ``limit`` in sorted order; 0: all), row by row; ``stride < 4`` gives overlapping
    windows."""
    from tokenizers_vq.demo import image_to_patches  # noqa: PLC0415
    from tokenizers_vq.media import load_image  # noqa: PLC0415
    from tokenizers_vq.media import list_media  # noqa: PLC0415

    return torch.cat([image_to_patches(load_image(f), 4, stride)[0] for f in list_media(folder, "image", limit)])


def usage(q, x: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
          batch: int = 1 << 18) -> float:
    """Fraction of the codes of ``q`` used at least once on the rows of ``x`` (latents,
    or the inputs of ``encoder``)."""
    used = torch.zeros(q.codebook_size, dtype=torch.bool, device=x.device)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            z = x[i : i + batch]
            used[q.encode(z if encoder is None else encoder(z))] = True
    return float(used.float().mean())


class PatchAutoencoder(nn.Module):
    """Encoder ``(N, P) -> (N, D)``, the quantizer, decoder back to ``(N, P)``.

    Args:
        quantizer: any quantizer of latent size ``D``.
        proj: ``(P, D)``: the encoder is ``x @ proj`` plus a GELU branch whose output
            layer starts at zero, so training starts from the frozen stand-in.
        hidden: width of the encoder branch and of the decoder.
    """

    def __init__(self, quantizer: nn.Module, proj: torch.Tensor, hidden: int = 256):
        super().__init__()
        p, d = proj.shape
        self.quantizer, self.linear = quantizer, nn.Linear(p, d)
        self.branch = nn.Sequential(nn.Linear(p, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.decoder = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, p))
        with torch.no_grad():
            self.linear.weight.copy_(proj.T)
            self.linear.bias.zero_()
            self.branch[2].weight.zero_()
            self.branch[2].bias.zero_()

    def encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.branch(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, P)`` patches -> ``(N, P)`` reconstructions and the training loss (the
        MSE plus the quantizer's losses)."""
        out = self.quantizer(self.encoder(x))
        rec = self.decoder(out.quantized)
        return rec, F.mse_loss(rec, x) + out.total_loss()

    @torch.no_grad()
    def mse(self, x: torch.Tensor, batch: int = 1 << 18) -> float:
        """Reconstruction MSE over the rows of ``x``; switches the model to eval mode."""
        self.eval()
        return sum(float(F.mse_loss(self(x[i : i + batch])[0], x[i : i + batch], reduction="sum"))
                   for i in range(0, len(x), batch)) / x.numel()


def train(q, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int = 0,
          model: PatchAutoencoder | None = None) -> float:
    """Adam on random batches of the rows of ``data``: latents fed to ``q`` (frozen
    encoder), or patches through ``model``, which holds ``q``. Returns the seconds."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    net = q if model is None else model
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if params else None
    net.train()
    start = time.time()
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=gen, device=data.device)]
        loss = q(x).total_loss() if model is None else model(x)[1]
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if data.is_cuda:
        torch.cuda.synchronize()
    net.eval()
    return time.time() - start


def run(train_dir: str, val_dir: str, k: int = 100_000, dim: int = 16, steps: int = 2000, batch: int = 65536,
        kmeans_iters: int = 10, device: str | None = None, seed: int = 0, encoder: Encoder = "frozen",
        trainable_steps: int = 12000, trainable_batch: int = 65536, lr: float = 1e-3, beta: float = 0.25,
        train_images: int = 0, val_images: int = 0, dense_stride: int = 1, out: Path | None = None,
        kmeans_balance: float = 0.25) -> dict:
    """Train and measure the quantizers on patches of the photos in ``train_dir`` and
    ``val_dir``; returns the results (the JSON's content).

    Args:
        encoder: which setups run: ``"frozen"``, ``"trainable"`` (see the module
            doc) or ``"both"``.
        steps, batch: Adam steps and batch of the frozen-encoder setups;
            ``trainable_steps``, ``trainable_batch``: of the trainable-encoder ones.
        beta: commitment weight of every quantizer.
        train_images, val_images: the first photos of each folder (0: all).
        dense_stride: stride of the windows of the dense held-out usage (0: skip it).
        kmeans_balance: the projected codebook also runs on features from a balanced
            k-means (``balance`` of :func:`kmeans`: small clusters re-seeded in big
            ones), with its own ceiling row (0: skip).
        out: folder rewritten after each setup (:func:`save`), so that a run cut short
            keeps its finished rows; rows there from an earlier run of the same
            data, ``k`` and ``dim`` on the same device are kept unless re-run.
    """
    from tokenizers_vq.quantizers import ProjectedCodebookVQ, VectorQuantizer  # noqa: PLC0415
    from tokenizers_vq.quantizers.kmeans import kmeans  # noqa: PLC0415

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    train_x, val_x = photo_patches(train_dir, train_images).to(device), photo_patches(val_dir, val_images).to(device)
    dense_x = photo_patches(val_dir, val_images, dense_stride).to(device) if dense_stride else val_x[:0]
    proj = (torch.randn(48, dim, generator=torch.Generator().manual_seed(seed + 1)) / 48**0.5).to(device)
    frozen = partial(torch.matmul, other=proj)
    t0 = time.time()
    feats, _ = kmeans(train_x, k, iters=kmeans_iters, generator=torch.Generator().manual_seed(seed))
    kmeans_s = time.time() - t0
    feats_bal = None
    if kmeans_balance > 0:
        feats_bal, _ = kmeans(train_x, k, iters=kmeans_iters, generator=torch.Generator().manual_seed(seed),
                              balance=kmeans_balance)

    def ceiling(features: torch.Tensor) -> dict:
        true_map = ProjectedCodebookVQ(dim, k, features=features, fit_projector=False, check_finite=False).to(device)
        with torch.no_grad():
            true_map.projector.weight.copy_(proj.T)
            true_map.projector.bias.zero_()
        return {"val": usage(true_map, val_x, frozen), "train": usage(true_map, train_x, frozen),
                "val_dense": usage(true_map, dense_x, frozen) if dense_stride else None}
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "k": k, "dim": dim, "steps": steps, "batch": batch,
        "seed": seed, "kmeans_iters": kmeans_iters, "kmeans_balance": kmeans_balance,
        "train_patches": len(train_x), "val_patches": len(val_x), "val_dense_patches": len(dense_x),
        "kmeans_seconds": kmeans_s,
        "uniform_ceiling_val": 1 - math.exp(-len(val_x) / k),
        "uniform_ceiling_train": 1 - math.exp(-len(train_x) / k),
        "kmeans_codebook_true_projection": ceiling(feats),
        "balanced_kmeans_codebook_true_projection": ceiling(feats_bal) if feats_bal is not None else None,
        "methods": {},
    }
    result["methods"] = previous_rows(out, result)
    projected = partial(ProjectedCodebookVQ, dim, k, features=feats, beta=beta, check_finite=False)
    ema = partial(VectorQuantizer, dim, k, kmeans_init=True, kmeans_max_samples=4 * k, beta=beta, check_finite=False)
    setups = {
        "projected (VQGAN-LC), linear projector": ("frozen", projected),
        "VQ-EMA, random init, no restarts": (
            "frozen", partial(VectorQuantizer, dim, k, restart_dead_codes=False, beta=beta, check_finite=False)),
        "VQ-EMA, k-means init + dead-code restarts": ("frozen", ema),
        "trainable encoder + projected (VQGAN-LC)": ("trainable", projected),
        "trainable encoder + VQ-EMA, k-means init + dead-code restarts": ("trainable", ema),
    }
    if feats_bal is not None:  # first, before the rows a short run could cut
        bal = partial(ProjectedCodebookVQ, dim, k, features=feats_bal, beta=beta, check_finite=False)
        setups = {f"projected (VQGAN-LC), balanced k-means features ({kmeans_balance})": ("frozen", bal), **setups}
    train_z = frozen(train_x) if encoder != "trainable" else None
    for name, (kind, make) in setups.items():
        if encoder not in (kind, "both"):
            continue
        torch.manual_seed(seed)
        q = make().to(device)
        row = {}
        if kind == "frozen":
            n, b, enc = steps, batch, frozen
            secs = train(q, train_z, n, b, lr=lr, seed=seed)
        else:
            n, b = trainable_steps, trainable_batch
            model = PatchAutoencoder(q, proj).to(device)
            secs, enc = train(q, train_x, n, b, lr=lr, seed=seed, model=model), model.encoder
            row["val_mse"] = model.mse(val_x)
        row.update(val=usage(q, val_x, enc), train=usage(q, train_x, enc), train_seconds=secs,
                   ms_per_step=1000 * secs / n, steps=n, batch=b, beta=beta, lr=lr, date=result["date"])
        if dense_stride:
            row["val_dense"] = usage(q, dense_x, enc)
        result["methods"][name] = row
        print(name, json.dumps(row), flush=True)
        if out is not None:
            save(result, out)
    return result


def previous_rows(out: Path | None, result: dict) -> dict:
    """The rows of an earlier ``codebook_scale.json`` in ``out`` made on the same device
    from the same data, codebook features and seed as ``result``."""
    path = out / "codebook_scale.json" if out is not None else None
    if path is None or not path.exists():
        return {}
    old = json.loads(path.read_text())
    if any(old.get(key) != result[key] for key in ("device", "k", "dim", "seed", "kmeans_iters", "kmeans_balance",
                                             "train_patches",
                                             "val_patches", "val_dense_patches")):
        return {}
    return {m: {"steps": old["steps"], "batch": old["batch"], "date": old["date"], **row}
            for m, row in old["methods"].items()}


def save(r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "codebook_scale.json").write_text(json.dumps(r, indent=1))
    (out / "codebook_scale.md").write_text(markdown(r))


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.1%}"


def markdown(r: dict) -> str:
    n_dense = r.get("val_dense_patches", 0)
    dense = f" ({n_dense:,} overlapping held-out windows for the dense column)" if n_dense else ""
    lines = [
        f"# Codebook utilisation at K = {r['k']:,} ({r['device']}, {r['date']})",
        "",
        f"4x4 RGB patches of real photos: {r['train_patches']:,} training patches, {r['val_patches']:,} held-out "
        f"patches{dense}. Frozen "
        f"encoder: a fixed random projection to {r['dim']} dims; trainable encoder: that projection plus an MLP "
        "branch, trained with an MLP decoder on the patches' MSE (val MSE: held-out patches in [-1, 1]). "
        f"Usage = share of the {r['k']:,} codes assigned to at least one patch.",
        "",
        "| quantizer | held-out usage | held-out, dense | training-set usage | val MSE | steps x batch | ms/step | date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in r["methods"].items():
        mse = f"{m['val_mse']:.4f}" if "val_mse" in m else ""
        lines.append(f"| {name} | {_pct(m['val'])} | {_pct(m.get('val_dense'))} | {_pct(m['train'])} | {mse} | "
                     f"{m.get('steps', r['steps'])} x {m.get('batch', r['batch']):,} | {m['ms_per_step']:.2f} | "
                     f"{m.get('date', r['date'])} |")
    c = r["kmeans_codebook_true_projection"]
    lines += [
        f"| ceiling (frozen encoder): the k-means codebook through the true projection | {_pct(c['val'])} | "
        f"{_pct(c.get('val_dense'))} | {_pct(c['train'])} | | | | |",
        *([f"| ceiling (frozen encoder): the balanced k-means codebook ({r['kmeans_balance']}) through the true "
           f"projection | {_pct(b['val'])} | {_pct(b.get('val_dense'))} | {_pct(b['train'])} | | | | |"]
          if (b := r.get("balanced_kmeans_codebook_true_projection")) else []),
        f"| ceiling: codes used uniformly, 1 - exp(-n/K) | {_pct(r['uniform_ceiling_val'])} | | "
        f"{_pct(r['uniform_ceiling_train'])} | | | | |",
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
    p.add_argument("--encoder", choices=ENCODERS, default="frozen", help="which setups run (see the module doc)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of the frozen-encoder setups")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--trainable-steps", type=int, default=12000)
    p.add_argument("--trainable-batch", type=int, default=65536)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.25, help="commitment weight of every quantizer")
    p.add_argument("--train-images", type=int, default=0, help="first N training photos (0: all)")
    p.add_argument("--val-images", type=int, default=0, help="first N held-out photos (0: all)")
    p.add_argument("--dense-stride", type=int, default=1, help="window stride of the dense held-out usage (0: skip)")
    p.add_argument("--kmeans-balance", type=float, default=0.25,
                   help="also run the projected codebook on balanced k-means features (0: skip)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the projection, the k-means and the batches")
    args = p.parse_args()
    r = run(args.train, args.val, args.k, args.dim, args.steps, args.batch, device=args.device, encoder=args.encoder,
            trainable_steps=args.trainable_steps, trainable_batch=args.trainable_batch, lr=args.lr, beta=args.beta,
            train_images=args.train_images, val_images=args.val_images, dense_stride=args.dense_stride,
            seed=args.seed, out=Path(args.out), kmeans_balance=args.kmeans_balance)
    print(markdown(r))


if __name__ == "__main__":
    main()
