"""Train the token prior on an export directory and sample media from it.

Sequences are random windows of each item's code grid (``window`` x ``window``
cells for images and inside one latent frame of a video, ``window`` frames for audio) in raster order with all codes of a
cell together, so images of any size train one fixed-length model. The validation
loss (nats/token) is measured on fixed windows of held-apart items and compared with a
unigram model of the training items' codes scored on the same windows: a prior that learned
anything beats it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenizers_vq import modality
from tokenizers_vq.export import TokenDataset
from tokenizers_vq.export_record import same_weights
from tokenizers_vq.io import check_can_write
from tokenizers_vq.prior import PriorConfig, TokenPrior
from tokenizers_vq.quantizers.base import evaluating


@dataclass
class PriorTrainConfig:
    export_dir: str = ""
    out_dir: str = "runs/prior"
    window: int = 8
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.1
    val_fraction: float = 0.1
    val_windows: int = 256
    seed: int = 0
    max_minutes: float = 0.0
    prior: PriorConfig = field(default_factory=PriorConfig)


def _grid(ds: TokenDataset, i: int) -> tuple[int, ...]:
    """Item ``i``'s code grid (its stored shape without the per-cell code axes)."""
    shape = ds.items[i][1]["shape"]
    return tuple(shape[: len(shape) - len(ds.manifest["code_shape"])])


def _windows(ds: TokenDataset, items: list[int], window: int, axes: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows (items drawn with replacement) as ``(n, L)`` token ids: ``window``
    cells along each of the grid's last ``axes`` axes, at one random place along the others
    (a video's window lies inside one latent frame)."""
    out = []
    for i in torch.randint(0, len(items), (n,), generator=gen).tolist():
        codes = ds.codes(items[i])
        grid = _grid(ds, items[i])
        for axis, g in enumerate(grid):
            span = window if axis >= len(grid) - axes else 1
            codes = codes.narrow(axis, int(torch.randint(0, g - span + 1, (1,), generator=gen)), span)
        out.append(codes.reshape(-1))
    return torch.stack(out)


def _split(ds: TokenDataset, window: int, axes: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Training and held-apart items among those whose grid holds a window (the others are
    skipped, with a note); the last ``val_fraction`` of them (at least one) held apart."""
    fits = [i for i in range(len(ds)) if min(_grid(ds, i)[-axes:], default=0) >= window]
    if len(fits) < 2:
        largest = max((_grid(ds, i) for i in range(len(ds))), key=lambda g: min(g[-axes:], default=0), default=None)
        raise ValueError(f"the prior needs at least 2 items whose code grid holds a window of {window} cells per axis "
                         f"(one is held apart to score it); {ds.dir} has {len(ds)} item(s), {len(fits)} large enough "
                         f"(largest grid {largest}): export more items, or give a smaller --window")
    if len(fits) < len(ds):
        tqdm.write(f"prior: skipping {len(ds) - len(fits)} of {len(ds)} items, whose code grid is smaller than "
                   f"the window of {window} cells per axis", file=sys.stderr)
    n_val = max(1, int(round(len(fits) * val_fraction)))
    n_val = min(n_val, len(fits) - 1)
    return fits[:-n_val], fits[-n_val:]


@torch.no_grad()
def val_loss(prior: TokenPrior, val: torch.Tensor, batch: int = 64) -> float:
    with evaluating(prior):  # (its mode back after: a prior loaded for eval stays in eval)
        total = sum(float(prior(val[i : i + batch])[1]) * len(val[i : i + batch]) for i in range(0, len(val), batch))
    return total / len(val)


def train_prior(cfg: PriorTrainConfig, device: str = "cpu") -> tuple[TokenPrior, dict[str, Any]]:
    """Train; returns the prior (in eval mode) and a summary (val nats/token, unigram entropy, speed)."""
    if cfg.steps < 1 or cfg.window < 1 or cfg.batch_size < 1 or cfg.val_windows < 1:
        raise ValueError(f"steps={cfg.steps}, window={cfg.window}, batch_size={cfg.batch_size}, "
                         f"val_windows={cfg.val_windows}: each must be >= 1")
    torch.manual_seed(cfg.seed)
    ds = TokenDataset(cfg.export_dir)
    if ds.layout != "grid":
        raise ValueError(f"{cfg.export_dir} holds dynamic-length tokens (a variable number per item), and the prior "
                         "trains on windows of fixed code grids: export with a fixed-rate model")
    ds.check_tokens()  # a damaged shard, not an index error mid-training
    grid_axes = modality.get(ds.manifest["modality"]).window_axes
    train_items, val_items = _split(ds, cfg.window, grid_axes, cfg.val_fraction)
    per_cell = math.prod(ds.manifest["code_shape"]) if ds.manifest["code_shape"] else 1
    length = cfg.window**grid_axes * per_cell
    pcfg = PriorConfig(**{**asdict(cfg.prior), "vocab_size": ds.manifest["codebook_size"], "block_size": length,
                          "tokens_of": str(ds.manifest.get("model_id", "")), "tokens_weights_sha256": _recorded_weights(cfg.export_dir)})
    prior = TokenPrior(pcfg).to(device)
    opt = torch.optim.AdamW(prior.parameters(), cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    warm = min(100, max(1, cfg.steps // 10))  # a short run is not spent warming up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    val = _windows(ds, val_items, cfg.window, grid_axes, cfg.val_windows, torch.Generator().manual_seed(1234)).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    if (out / "prior.safetensors").exists():  # (another export's, or other settings': not lost)
        raise ValueError(f"{out} holds a trained prior already: name another output folder (--out), or delete "
                         f"{out / 'prior.safetensors'} first")
    check_can_write(out / "prior.safetensors")  # refused now, not after the training
    out.mkdir(parents=True, exist_ok=True)
    start, history, done, interrupted = time.time(), [], 0, False
    try:
        for step in tqdm(range(cfg.steps), desc="prior"):
            x = _windows(ds, train_items, cfg.window, grid_axes, cfg.batch_size, gen).to(device)
            _, loss = prior(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            opt.step()
            sched.step()
            done = step + 1
            if done % max(1, cfg.steps // 10) == 0:
                history.append({"step": done, "train_loss": float(loss.detach()), "val_loss": val_loss(prior, val)})
            if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
                break
    except KeyboardInterrupt:  # the steps done are kept: saved below, then the interrupt goes on
        interrupted = True
    summary = {
        "steps": done,
        "seconds": time.time() - start,
        "val_nats_per_token": val_loss(prior, val),
        "unigram_entropy_nats": ds.unigram_entropy(),  # over the whole export
        "unigram_val_nats_per_token": unigram_nats(ds, train_items, val),
        "tokens_per_sequence": length,
        "history": history,
        "config": asdict(cfg),
    }
    prior.save(out)  # prior.safetensors + prior_config.json: TokenPrior.load(out)
    (out / "prior_summary.json").write_text(json.dumps(summary, indent=1))
    if interrupted:
        raise KeyboardInterrupt(f"the prior trained for {done} of {cfg.steps} steps is saved in {out} (TokenPrior.load)")
    return prior.eval(), summary


def unigram_nats(ds: TokenDataset, items: list[int], val: torch.Tensor) -> float:
    """Nats/token on ``val`` of the unigram distribution of ``items``' codes (add-one smoothed,
    so a code they lack costs a finite amount): the baseline a prior must beat."""
    counts = torch.ones(ds.manifest["codebook_size"], dtype=torch.float64)
    for i in items:
        counts += torch.bincount(ds.codes(i).reshape(-1).long(), minlength=len(counts)).double()
    return float(-(counts / counts.sum()).log()[val.reshape(-1).cpu()].mean())


def _recorded_weights(export_dir: str | Path) -> str:
    """The ``weights_sha256`` an export recorded of the model that wrote it (``""``: none)."""
    try:
        return str(json.loads((Path(export_dir) / "export.json").read_text()).get("weights_sha256") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def check_model(export_dir: str | Path, manifest: dict[str, Any], tok) -> str | None:
    """Refuse a tokenizer that cannot decode an export's tokens (``ValueError`` naming both:
    another modality, codebook size or code shape); return a warning where its weights differ
    from those the export recorded (pictures sampled from the prior then decode otherwise)."""
    theirs = (manifest.get("modality"), manifest.get("codebook_size"), tuple(manifest.get("code_shape") or ()))
    if theirs != (tok.modality, tok.quantizer.codebook_size, tuple(tok.quantizer.code_shape)):
        raise ValueError(f"{export_dir} holds {theirs[0]} tokens of model {manifest.get('model_id')!r} (codebook "
                         f"{theirs[1]}, code shape {theirs[2]}), but the model is {tok.modality} {tok.config.name!r} "
                         f"(codebook {tok.quantizer.codebook_size}, code shape {tuple(tok.quantizer.code_shape)}): "
                         "pass --model of the model that wrote them")
    recorded = _recorded_weights(export_dir)
    if not recorded or same_weights(recorded, tok):
        return None
    return (f"{export_dir} was written by a model named {manifest.get('model_id')!r} with other weights than "
            f"{tok.config.name!r} here: its sampled pictures decode with these (pass --model of the model that wrote them)")


@torch.no_grad()
def sample_images(prior: TokenPrior, tok, n: int, window: int, path: str | Path, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Sample ``n`` code grids, decode them with the tokenizer and save one picture."""
    from tokenizers_vq.viz import image_grid  # noqa: PLC0415

    gen = torch.Generator(device=next(prior.parameters()).device).manual_seed(seed)
    labels = torch.zeros(n, dtype=torch.long, device=gen.device)
    ids = prior.eval().generate(labels, prior.cfg.block_size, temperature, top_k, top_p, generator=gen)
    codes = ids.reshape(n, window, window, *tok.quantizer.code_shape).to(next(tok.parameters()).device)
    images = ((tok.decode(codes) + 1) / 2).clamp(0, 1).cpu()
    image_grid([list(images)], path)
    return codes
