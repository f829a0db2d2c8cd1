"""``tvq eval``: metrics.json, report.md and pictures for a tokenizer on a folder."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch

from tokenizers_vq.eval.baselines import run_baselines
from tokenizers_vq.eval.evaluate import evaluate
from tokenizers_vq.eval.inception import FIDInception, load_inception
from tokenizers_vq.lpips import LPIPSNet, load_lpips
from tokenizers_vq.io import atomic_write, check_can_write
from tokenizers_vq.modality import get as get_modality
from tokenizers_vq.tokenizer import Tokenizer

# feature-network metrics this report does not compute at all
NOT_IMPLEMENTED = {
    "video": {"fvd": "FVD skipped: needs I3D weights"},
    "audio": {"utmos": "UTMOS skipped: needs its pretrained predictor"},
}


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _feature_nets(modality: str, device: torch.device, lpips_weights: str | Path | None, lpips_heads: str | Path | None,
                  fid_weights: str | Path | None) -> tuple[LPIPSNet | None, FIDInception | None, dict[str, str]]:
    """LPIPS (images, video) and the FID Inception (images) from their weight files, on
    ``device``, and a skip line naming the file looked for in place of each one absent from the
    torch hub cache (a file named and absent is refused: ``FileNotFoundError``), or given for
    media the metric does not score."""
    lpips = inception = None
    skipped = dict(NOT_IMPLEMENTED.get(modality, {}))
    media = get_modality(modality)
    if media.has_pixels:
        try:
            lpips = load_lpips(lpips_weights, lpips_heads).to(device)
        except FileNotFoundError as e:
            if lpips_weights or lpips_heads:  # a file named and absent: refused, not skipped
                raise
            skipped["lpips"] = f"LPIPS skipped: {e}"
    elif lpips_weights or lpips_heads:
        skipped["lpips"] = f"the LPIPS weights given are not used: LPIPS scores pictures, not {modality}"
    if media.fid:
        try:
            inception = load_inception(fid_weights).to(device)
        except FileNotFoundError as e:
            if fid_weights:
                raise
            skipped["rfid"] = f"rFID skipped: {e}"
    elif fid_weights:
        skipped["rfid"] = f"the Inception weights given are not used: rFID scores images, not {modality}"
    return lpips, inception, skipped


BETTER = {"psnr_db": 1, "ssim": 1, "ms_ssim": 1, "lpips": -1, "flicker": -1, "colour_shift": -1, "stoi": 1,
          "pesq_wb": 1, "mel_distance": -1, "stft_distance": -1, "si_sdr_db": 1}
"""Metrics of the side-by-side table: +1 where higher is better, -1 where lower is."""
RATES = {"image": ["bits_per_pixel"], "audio": ["kbps"], "video": ["kbps", "bits_per_pixel"]}


def baseline_lines(modality: str, summary: dict[str, Any], baselines: dict[str, Any]) -> list[str]:
    """The report's section comparing the tokenizer (first row, its ``summary``) with
    each codec of :func:`run_baselines`'s result, and a line per codec that beats it
    on some metric, with how many more or fewer bits that codec spent."""
    rates = RATES[modality]
    mine = {**summary, **baselines["target"]}
    keys = [k for k in BETTER if isinstance(mine.get(k), float)]

    def cells(s: dict[str, Any]) -> str:
        return " | ".join("n/a" if s.get(k) is None else f"{s[k]:.4f}" for k in rates + keys)

    note = {"audio": " Codec2 runs at its mode nearest the tokenizer's kbps; Opus at 6 kbps, its lowest usable rate.",
            "image": " JPEG/WebP at their lowest quality can exceed the tokenizer's bits on detailed photos.",
            "video": " H.264/H.265 run at the best constant quality (CRF) that fits the tokenizer's bits per clip."}
    lines = ["## Classical codecs near the same bitrate", "",
             "Each file also encoded by real codecs at the tokenizer's bits for it; rates are those each codec "
             "achieved, and `over budget` counts the items where it spent more bits than the tokenizer."
             + note[modality], "",
             "| codec | " + " | ".join(rates + keys) + " | over budget |", "|---" * (2 + len(rates) + len(keys)) + "|",
             f"| tokenizer | {cells(mine)} | - |"]
    losses, partial = [], []
    for name, c in baselines["codecs"].items():
        s, ref = c["summary"], c.get("tokenizer", mine)  # a codec that refused files: the tokenizer on its files
        if "tokenizer" in c:
            partial += [f"- `{name}` coded {s['items']} of {s['items'] + len(c['failed'])} files; its row and its "
                        f"comparison are over those (the tokenizer there: {cells(ref)}). Refused:"]
            partial += [f"  - {why}" for why in c["failed"]]
        lines.append(f"| {name} | {cells(s)} | {s['over_budget']}/{s['items']} |")
        beaten = [f"{k} {s[k]:.4f} vs {ref[k]:.4f}" for k in keys
                  if s.get(k) is not None and ref.get(k) is not None and (s[k] - ref[k]) * BETTER[k] > 0]
        if beaten:
            losses.append(f"- `{name}`, spending {s[rates[0]] / ref[rates[0]] - 1:+.0%} bits: " + ", ".join(beaten))
    if partial:
        lines += ["", "Codecs that refused some files:", "", *partial]
    if losses:
        lines += ["", "Where the tokenizer loses (codec vs tokenizer):", "", *losses]
    elif baselines["codecs"]:
        lines += ["", "The tokenizer beats every codec that ran on every metric in the table."]
    if baselines["skipped"]:
        lines += ["", "Codecs not run:", ""] + [f"- {n}: {v}" for n, v in baselines["skipped"].items()]
    return lines


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
                 fid_weights: str | Path | None = None, baselines: bool = False,
                 max_frames: int | None = 33, notes: list[str] | None = None) -> dict[str, Any]:
    """Evaluate and write ``metrics.json``, ``report.md``, ``metric_distributions.png``,
    ``codebook_usage.png`` and reconstruction pictures (via the trainer's sample writer).
    ``notes``: lines on what is not evaluated (the folder's other media,
    :func:`~tokenizers_vq.media.left_out`; parts of files the model does not code,
    :func:`~tokenizers_vq.media.uncoded_parts`), repeated in the report.

    ``baselines`` adds a ``baselines`` section (:func:`run_baselines`: classical codecs
    at the tokenizer's bitrate on the same files) to metrics.json and its table to the report.

    LPIPS and rFID are computed when their weight files are found (paths here, else the
    defaults of :func:`load_lpips` / :func:`load_inception`) and listed under
    ``skipped`` with the path looked for when not (a file named and absent raises ``FileNotFoundError``). Videos are measured over their first
    ``max_frames`` frames (``None``: all), which the report states.
    """
    from tokenizers_vq import samples  # noqa: PLC0415
    from tokenizers_vq.viz import usage_plot  # noqa: PLC0415

    out_dir = Path(out_dir)
    check_can_write(out_dir / "metrics.json")  # an unwritable folder is named before the work, not after
    device = next(tok.parameters()).device
    lpips, inception, skipped = _feature_nets(tok.modality, device, lpips_weights, lpips_heads, fid_weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate(tok, files, max_frames=max_frames, lpips=lpips, inception=inception)
    histogram = result.pop("code_histogram")
    refused = {entry["file"] for entry in result["failed"]}
    files = [f for f in files if str(f) not in refused]
    if inception is not None and "rfid" not in result["summary"]:
        skipped["rfid"] = f"rFID skipped: needs at least 2 images, got {len(files)}"
    for key, name, package in tok.media.optional_metrics:
        if result["summary"].get(key) is None:
            installed = importlib.util.find_spec(package) is not None
            why = "; ".join(sorted({n for it in result["items"] if (n := it.get(f"{key}_note"))}))
            skipped[key] = (f"{name} skipped: no item could be scored ({why or 'no speech in the references?'})"
                            if installed else f"{name} skipped: the {package} package is not installed")
    result["skipped"] = skipped
    result["model"] = model_name
    result["config"] = json.loads(json.dumps(tok.config, default=lambda o: o.__dict__))
    if baselines:
        result["baselines"] = run_baselines(tok, files, result["items"], max_frames=max_frames, lpips=lpips)
    keys = [k for k in ("psnr_db", "ssim", "lpips", "mel_distance", "stoi", "si_sdr_db") if k in result["summary"]]
    _distribution_plot(result["items"], keys, out_dir / "metric_distributions.png")
    try:  # pictures of the first files, over the frames measured (at most a clip): their failure is a note
        samples.write(tok, files, out_dir / "samples", max_frames=max_frames)
    except (ValueError, OSError, RuntimeError) as e:
        skipped["samples"] = f"reconstruction pictures not written: {e}"
    usage_plot({model_name: histogram}, out_dir / "codebook_usage.png",  # the tokens the metrics are over
               title=f"codebook usage over {len(files)} files")
    text = json.dumps(_finite(result), indent=1, allow_nan=False)  # standard JSON: no NaN or Infinity
    atomic_write(out_dir / "metrics.json", lambda tmp: Path(tmp).write_text(text))  # with report.md: last

    clips = (f" Each video over its first {max_frames} frames (`--max-frames`; 0: all)."
             if tok.modality == "video" and max_frames else "")
    lines = [f"# Evaluation of `{model_name}`", "",
             f"{len(files)} {tok.modality} file{'s' if len(files) != 1 else ''}, device "
             f"{result['summary']['device']}.{clips} Each metric is the mean of its per-file values (PSNR too: not "
             "from the pooled squared error" + ("; a video's PSNR is the mean of its frames'" if tok.modality == "video" else "")
             + ").", "", "| metric | mean |", "|---|---|"]
    for k, v in result["summary"].items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.4f} |")
    for k, n in result["summary"].get("unscored", {}).items():
        scored = result["summary"]["items"] - n
        lines += ["", f"{k} is the mean over the {scored} of {scored + n} files it is defined for; "
                  f"the items' notes in metrics.json say why the others have none."]
    if result["summary"].get("usage_ceiling", 1.0) < 1.0:
        ceiling = result["summary"]["usage_ceiling"]
        lines += ["", f"usage counts the codes these tokens reached: with fewer tokens (per codebook) than codes, at "
                  f"most {100 * ceiling:.1f}% of the {tok.quantizer.codebook_size:,} codes can appear, so it does not "
                  "measure collapse here; perplexity is likewise at most the token count (entropy_bits its log2)."]
    if "rfid" in result["summary"]:
        lines += ["", f"rFID is over {result['summary']['rfid_images']} images. FID is biased upwards for few images "
                  "(the usual count is 50,000): compare only values over the same images."]
    if baselines:
        lines += [""] + baseline_lines(tok.modality, result["summary"], result["baselines"])
    if skipped:
        lines += ["", "## Not computed", ""] + [f"- {v}" for v in skipped.values()]
    if result["failed"]:
        lines += ["", f"## Files left out ({len(result['failed'])}: not read, or not scored)", ""] + [f"- {e['error']}" for e in result["failed"]]
    if notes:
        lines += ["", "## Not evaluated (other media in the folder, parts of files the model does not code)", ""] + [f"- {n.removeprefix('tvq: note: ')}" for n in notes]
    lines += ["", "Pictures: `samples/` (reconstructions), `codebook_usage.png`, `metric_distributions.png`."]
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return result
