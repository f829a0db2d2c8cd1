"""Rate-distortion of a codebook family shrunk from one trained image tokenizer.

For each size the tokenizer's VQ codebook is k-means'd down (``shrink_codebook``),
the images are re-encoded, and we report PSNR, the empirical entropy of the tokens
and the real size of the token stream under our rANS coder and under zlib, as bits
per pixel.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from tokenizers_vq.eval.metrics import psnr
from tokenizers_vq.io import atomic_write
from tokenizers_vq.media import load_image
from tokenizers_vq.bitrate import encode_tokens, entropy_bits, zlib_size
from tokenizers_vq.quantizers.shrink import shrink_codebook
from tokenizers_vq.tokenizer import Tokenizer


@torch.no_grad()
def rate_distortion(tok: Tokenizer, files: list[Path], sizes: list[int]) -> list[dict[str, Any]]:
    """One row per codebook size (the original size first), on the tokenizer's device."""
    device = next(tok.parameters()).device
    images = [load_image(f).to(device) for f in files]
    pixels = sum(img.shape[1] * img.shape[2] for img in images)
    rows = []
    for size in [tok.quantizer.codebook_size, *sizes]:
        model = tok
        if size != tok.quantizer.codebook_size:
            model = copy.deepcopy(tok)
            model.quantizer = shrink_codebook(tok.quantizer, size)[0].eval()
        tokens, err = [], []
        for img in images:
            codes = model.encode(img[None] * 2 - 1)
            rec = ((model.decode(codes, size=tuple(img.shape[1:]))[0] + 1) / 2).clamp(0, 1)
            tokens.append(codes.reshape(-1))
            err.append(psnr(rec, img))
        stream = torch.cat(tokens).cpu()
        rows.append({
            "codebook_size": size,
            "psnr_db": sum(err) / len(err),
            "bits_per_token_fixed": math.log2(size),
            "bits_per_token_entropy": entropy_bits(stream),
            "bpp_fixed": len(stream) * math.log2(size) / pixels,
            "bpp_rans": len(encode_tokens(stream, size)) * 8 / pixels,
            "bpp_zlib": zlib_size(stream, size) * 8 / pixels,
        })
    return rows


def write_table(rows: list[dict[str, Any]], out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "rate_distortion.json", lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    lines = [f"# {title}", "", "| codes | PSNR dB | bits/token (entropy) | bpp fixed | bpp rANS | bpp zlib |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['codebook_size']} | {r['psnr_db']:.2f} | {r['bits_per_token_entropy']:.2f} | "
                     f"{r['bpp_fixed']:.4f} | {r['bpp_rans']:.4f} | {r['bpp_zlib']:.4f} |")
    atomic_write(out_dir / "rate_distortion.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def main(argv: list[str] | None = None) -> None:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="folder of .jpg/.png photos (e.g. BSDS500 val)")
    ap.add_argument("n", type=int, help="first n photos in sorted order")
    ap.add_argument("out", type=Path)
    ap.add_argument("--sizes", default="256,64,16", help="shrunk codebook sizes")
    ap.add_argument("--device", default="cpu", help="e.g. cuda")
    args = ap.parse_args(argv)
    files = sorted([*args.folder.glob("*.jpg"), *args.folder.glob("*.png")])[: args.n]
    if not files:
        raise SystemExit(f"no .jpg or .png photos in {args.folder}")
    tok = Tokenizer.from_pretrained().to(args.device).eval()
    rows = rate_distortion(tok, files, [int(v) for v in args.sizes.split(",")])
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    write_table(rows, args.out, f"Rate-distortion of {tok.config.name} shrunk by k-means, {len(files)} photos "
                                f"of {args.folder.name}, {where}")
    print((args.out / "rate_distortion.md").read_text())


if __name__ == "__main__":
    main()
