"""``tvq eval``: metrics.json, report.md and pictures for a tokenizer on a folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from tokenizers_vq.eval.evaluate import evaluate
from tokenizers_vq.io import atomic_write
from tokenizers_vq.quantizers._functional import code_histogram
from tokenizers_vq.tokenizer import Tokenizer

FEATURE_METRICS = {
    "image": {
        "lpips": "LPIPS needs torchvision VGG16 weights (vgg16-397923af.pth) in the torch hub cache",
        "rfid": "rFID needs Inception weights (pt_inception-2015-12-05-6726825d.pth)",
    },
    "video": {"fvd": "FVD needs I3D weights"},
    "audio": {"utmos": "UTMOS needs its pretrained predictor"},
}


def _weights_present(name: str) -> Path | None:
    files = {"lpips": "vgg16-397923af.pth", "rfid": "pt_inception-2015-12-05-6726825d.pth"}
    if name not in files:
        return None
    p = Path(torch.hub.get_dir()) / "checkpoints" / files[name]
    return p if p.is_file() else None


def _distribution_plot(items: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    from tokenizers_vq.viz import _pyplot  # noqa: PLC0415

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        vals = [it[key] for it in items if isinstance(it.get(key), (int, float)) and math.isfinite(it[key])]
        ax.hist(vals, bins=min(30, max(5, len(vals) // 3)), color="tab:blue")
        ax.set_title(f"{key} (n={len(vals)})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp))
    plt.close(fig)


def write_report(tok: Tokenizer, files: list[Path], out_dir: str | Path, model_name: str) -> dict[str, Any]:
    """Evaluate and write ``metrics.json``, ``report.md``, ``metric_distributions.png``,
    ``codebook_usage.png`` and reconstruction pictures (via the trainer's sample writer)."""
    from tokenizers_vq.train import samples  # noqa: PLC0415
    from tokenizers_vq.viz import usage_plot  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate(tok, files)
    skipped = {}
    for name, why in FEATURE_METRICS.get(tok.modality, {}).items():
        if _weights_present(name) is None:
            skipped[name] = f"skipped: {why}; not found under {Path(torch.hub.get_dir()) / 'checkpoints'}"
    for key in ("pesq_wb", "stoi"):
        if tok.modality == "audio" and result["summary"].get(key) is None:
            skipped[key] = f"skipped: the {'pesq' if key == 'pesq_wb' else 'pystoi'} package is not installed"
    result["skipped"] = skipped
    result["model"] = model_name
    result["config"] = json.loads(json.dumps(tok.config, default=lambda o: o.__dict__))
    atomic_write(out_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))

    keys = [k for k in ("psnr_db", "ssim", "mel_distance", "stoi", "si_sdr_db") if k in result["summary"]]
    _distribution_plot(result["items"], keys, out_dir / "metric_distributions.png")
    samples.write(tok, files, out_dir / "samples")
    from tokenizers_vq.tokens import encode_file  # noqa: PLC0415

    codes = torch.cat([encode_file(tok, f, max_frames=17).codes.reshape(-1, tok.quantizer.num_codebooks)[:, 0] for f in files])
    usage_plot({model_name: code_histogram(codes.long(), tok.quantizer.codebook_size)}, out_dir / "codebook_usage.png",
               title=f"codebook usage over {len(files)} files")

    lines = [f"# Evaluation of `{model_name}`", "", f"{len(files)} {tok.modality} files, device {result['summary']['device']}.", "",
             "| metric | mean |", "|---|---|"]
    for k, v in result["summary"].items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4f} |")
    if skipped:
        lines += ["", "## Not computed", ""] + [f"- {k}: {v}" for k, v in skipped.items()]
    lines += ["", "Pictures: `samples/` (reconstructions), `codebook_usage.png`, `metric_distributions.png`."]
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return result
