"""The ``tvq`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from tokenizers_vq.demo import run_demo  # noqa: PLC0415

    results = run_demo(args.image, args.out, steps=args.steps, patch=args.patch)
    print(f"{'quantizer':<18} {'PSNR dB':>8} {'bits/px':>8} {'usage':>7}")
    for name, r in results.items():
        print(f"{name:<18} {r['psnr_db']:8.2f} {r['bits_per_pixel']:8.3f} {r['usage']:7.1%}")
    print(f"wrote {args.out}/reconstruction.png, codebook_usage.png, metrics.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvq", description="Discrete tokenizers for images, audio and video.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit the quantizers to a real photo and write reconstructions")
    demo.add_argument("image", nargs="?", help="image file (default: a photo shipped with matplotlib)")
    demo.add_argument("--out", default="tvq_demo", help="output folder (default: tvq_demo)")
    demo.add_argument("--steps", type=int, default=300, help="training steps per quantizer")
    demo.add_argument("--patch", type=int, default=4, help="patch size in pixels")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"tvq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
