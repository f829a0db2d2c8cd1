"""What an FSQ tokenizer's rounding costs: PSNR of each file reconstructed through the codes
and through the same bounded latent left unrounded (:meth:`FSQ.unrounded`), side by side.
A small gap says the quantizer's grid is not what limits the reconstructions; the
encoder and decoder (or the data they learned from) are.

    python -m tokenizers_vq.eval.rounding_gap --model video --data ../shared/data/video/cotracker/teddy.mp4 \\
        --max-frames 17 --max-side 256 --out eval/results/video_4x8x8/rounding_gap

Writes ``rounding_gap.json`` and ``rounding_gap.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenizers_vq.eval.metrics import psnr
from tokenizers_vq.quantizers.fsq import FSQ
from tokenizers_vq.tokenizer import Tokenizer


def aligned(tok: Tokenizer, x: Tensor, max_side: int | None) -> Tensor:
    """Model input ``(C, [T,] H, W)`` cut to what the backbone takes whole: sides to a
    multiple of the stride (after an area downscale to ``max_side`` on the longer side),
    video to ``1 + k * temporal_factor`` frames."""
    h, w = x.shape[-2:]
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        lead = x.shape[:-2]
        x = F.interpolate(x.reshape(-1, 1, h, w), size=(round(h * s), round(w * s)), mode="area")
        x = x.reshape(*lead, *x.shape[-2:])
    sh, sw = tok.backbone_config.stride
    x = x[..., : x.shape[-2] // sh * sh, : x.shape[-1] // sw * sw]
    if tok.media.clips:
        tf = tok.backbone_config.temporal_factor
        x = x[:, : 1 + (x.shape[1] - 1) // tf * tf]
    return x


def _psnr(rec: Tensor, x: Tensor) -> float:
    """PSNR in dB of model-space tensors in [-1, 1], measured as media in [0, 1]."""
    return psnr(((rec + 1) / 2).clamp(0, 1), (x + 1) / 2)


@torch.no_grad()
def gap(tok: Tokenizer, x: Tensor) -> dict[str, float]:
    """``{"rounded_db", "unrounded_db", "gap_db"}`` of one aligned input ``(C, ...)``."""
    h = tok.encoder(x[None]).movedim(1, -1)
    rounded = tok.decoder(tok.quantizer(h).quantized.movedim(-1, 1))
    unrounded = tok.decoder(tok.quantizer.unrounded(h).movedim(-1, 1))
    r, u = _psnr(rounded, x[None]), _psnr(unrounded, x[None])
    return {"rounded_db": r, "unrounded_db": u, "gap_db": u - r}


def main(argv: list[str] | None = None) -> None:
    from tokenizers_vq.media import is_frame_folder, list_media  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an embedded model's name or a model folder")
    p.add_argument("--data", nargs="+", required=True, help="files or folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-frames", type=int, default=17, help="video frames read per file (0: all)")
    p.add_argument("--max-side", type=int, default=0, help="area-downscale larger media to this longer side (0: as is)")
    args = p.parse_args(argv)
    if args.max_frames < 0:
        p.error(f"--max-frames {args.max_frames}: expected a frame count, or 0 for all")
    tok = Tokenizer.from_pretrained(args.model).eval()
    if not isinstance(tok.quantizer, FSQ):
        p.error(f"{args.model}: its quantizer is {type(tok.quantizer).__name__}; this measure needs FSQ")
    if not tok.media.has_pixels:
        p.error(f"{args.model}: an {tok.modality} model; this measure takes image and video models")
    files: list[Path] = []
    for d in map(Path, args.data):  # a file or a clip's frame folder is one item; other folders are listed
        files += [d] if d.is_file() or is_frame_folder(d) else list_media(d, tok.modality)
    rows: list[dict[str, Any]] = []
    for f in files:
        x, _, _ = tok.media.load(f, tok.sample_rate, max_frames=args.max_frames or None)
        x = aligned(tok, x, args.max_side or None)
        rows.append({"file": str(f), "shape": list(x.shape), **gap(tok, x)})
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": tok.config.name, "max_frames": args.max_frames, "max_side": args.max_side,
            "command": "python -m tokenizers_vq.eval.rounding_gap " + " ".join(sys.argv[1:] if argv is None else argv)}
    (args.out / "rounding_gap.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Rounding gap of `{meta['model']}`", "", f"Command: `{meta['command']}`", "",
             "| file | input (C, [T,] H, W) | PSNR through the codes | unrounded | gap |", "|---|---|---|---|---|"]
    lines += [f"| {Path(r['file']).name} | {tuple(r['shape'])} | {r['rounded_db']:.2f} dB | {r['unrounded_db']:.2f} dB | "
              f"{r['gap_db']:+.2f} dB |" for r in rows]
    if rows:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("rounded_db", "unrounded_db", "gap_db")}
        lines.append(f"| **mean** | | {mean['rounded_db']:.2f} dB | {mean['unrounded_db']:.2f} dB | {mean['gap_db']:+.2f} dB |")
    (args.out / "rounding_gap.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
