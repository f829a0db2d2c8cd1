"""``tvq eval``: metrics.json, report.md and pictures for a tokenizer on a folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from tokenizers_vq.eval.evaluate import evaluate
from tokenizers_vq.eval.inception import FIDInception, load_inception
from tokenizers_vq.eval.lpips import LPIPSNet, load_lpips
from tokenizers_vq.io import atomic_write
from tokenizers_vq.quantizers._functional import code_histogram
from tokenizers_vq.tokenizer import Tokenizer

# feature-network metrics this report does not compute at all
NOT_IMPLEMENTED = {
    "video": {"fvd": "FVD skipped: needs I3D weights"},
    "audio": {"utmos": "UTMOS skipped: needs its pretrained predictor"},
}


def _feature_nets(modality: str, device: torch.device, lpips_weights: str | Path | None, lpips_heads: str | Path | None,
                  fid_weights: str | Path | None) -> tuple[LPIPSNet | None, FIDInception | None, dict[str, str]]:
    """LPIPS (images, video) and the FID Inception (images) from their weight files, on
    ``device``, and a skip line naming the file looked for in place of each one absent."""
    lpips = inception = None
    skipped = dict(NOT_IMPLEMENTED.get(modality, {}))
    if modality in ("image", "video"):
        try:
            lpips = load_lpips(lpips_weights, lpips_heads).to(device)
        except FileNotFoundError as e:
            skipped["lpips"] = f"LPIPS skipped: {e}"
    if modality == "image":
        try:
            inception = load_inception(fid_weights).to(device)
        except FileNotFoundError as e:
            skipped["rfid"] = f"rFID skipped: {e}"
    return lpips, inception, skipped


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


def write_report(tok: Tokenizer, files: list[Path], out_dir: str | Path, model_name: str,
                 lpips_weights: str | Path | None = None, lpips_heads: str | Path | None = None,
                 fid_weights: str | Path | None = None) -> dict[str, Any]:
    """Evaluate and write ``metrics.json``, ``report.md``, ``metric_distributions.png``,
    ``codebook_usage.png`` and reconstruction pictures (via the trainer's sample writer).

    LPIPS and rFID are computed when their weight files are found (paths here, else the
    defaults of :func:`load_lpips` / :func:`load_inception`) and listed under
    ``skipped`` with the path looked for when not.
    """
    from tokenizers_vq.train import samples  # noqa: PLC0415
    from tokenizers_vq.viz import usage_plot  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(tok.parameters()).device
    lpips, inception, skipped = _feature_nets(tok.modality, device, lpips_weights, lpips_heads, fid_weights)
    result = evaluate(tok, files, lpips=lpips, inception=inception)
    if inception is not None and "rfid" not in result["summary"]:
        skipped["rfid"] = f"rFID skipped: needs at least 2 images, got {len(files)}"
    for key, name, package in (("pesq_wb", "PESQ", "pesq"), ("stoi", "STOI", "pystoi")):
        if tok.modality == "audio" and result["summary"].get(key) is None:
            skipped[key] = f"{name} skipped: the {package} package is not installed"
    result["skipped"] = skipped
    result["model"] = model_name
    result["config"] = json.loads(json.dumps(tok.config, default=lambda o: o.__dict__))
    atomic_write(out_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))

    keys = [k for k in ("psnr_db", "ssim", "lpips", "mel_distance", "stoi", "si_sdr_db") if k in result["summary"]]
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
    if "rfid" in result["summary"]:
        lines += ["", f"rFID is over {result['summary']['rfid_images']} images. FID is biased upwards for few images "
                  "(the usual count is 50,000): compare only values over the same images."]
    if skipped:
        lines += ["", "## Not computed", ""] + [f"- {v}" for v in skipped.values()]
    lines += ["", "Pictures: `samples/` (reconstructions), `codebook_usage.png`, `metric_distributions.png`."]
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return result
