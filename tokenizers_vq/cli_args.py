"""The ``tvq`` command line's grammar: its commands and their options (:func:`build_parser`),
and :func:`parse`, which names an unknown option with its command's own usage line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvq", description="Discrete tokenizers for images, audio and video.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # each command's own parser (its usage line for errors)
    demo = sub.add_parser("demo", help="fit the quantizers to a real photo and write reconstructions")
    demo.add_argument("image", nargs="?", help="image file (default: a photo shipped with matplotlib)")
    demo.add_argument("--out", default="tvq_demo", help="output folder (default: tvq_demo)")
    demo.add_argument("--steps", type=int, default=300, help="training steps per quantizer")
    demo.add_argument("--patch", type=int, default=4, help="patch size in pixels")

    train = sub.add_parser("train", help="train a tokenizer from a YAML config (accelerate: runs under accelerate launch)")
    train.add_argument("config", help="YAML config, or a shipped one by name: image, audio, video")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="section.key=value overrides, e.g. --steps=100")

    model_help = ("tokenizer directory (config.json + model.safetensors) or an embedded model: image, speech, "
                  "speech-rvq, video; default: by the inputs' type (encode, export, eval), the model that wrote the "
                  "token file (decode), else image")
    enc = sub.add_parser("encode", help="encode media files to one token file")
    enc.add_argument("files", nargs="+", help="media files of the model's modality")
    enc.add_argument("-o", "--output", required=True, help="token file to write (tvq-tokens/1, safetensors)")
    enc.add_argument("--max-pixels", type=int, default=None,
                     help="refuse larger images and video frames (default 4096*4096, for video frames 1920*1088; "
                          "memory grows with pixels; 0: no limit)")
    dec = sub.add_parser("decode", help="decode a token file back to media")
    dec.add_argument("tokens", help="token file written by tvq encode")
    dec.add_argument("-o", "--output", required=True, help="output file (one item) or directory")
    dec.add_argument("--overwrite", action="store_true", help="replace files of the items' names in the output directory")
    ev = sub.add_parser("eval", help="evaluate a tokenizer on a folder: report.md, metrics.json, pictures")
    ev.add_argument("--data", required=True, help="folder of media of the model's modality")
    ev.add_argument("--out", default="tvq_eval", help="output folder (default: tvq_eval)")
    ev.add_argument("--max-items", type=int, default=0, help="evaluate at most this many files (0: all)")
    ev.add_argument("--max-frames", type=int, default=33, help="videos: measure the first this many frames (0: all)")
    ev.add_argument("--lpips-weights", default=None,
                    help="torchvision vgg16-397923af.pth or alexnet-owt-7be5be79.pth for LPIPS (default: torch hub cache)")
    ev.add_argument("--lpips-heads", default=None, help="LPIPS v0.1 linear heads (default: from the installed lpips package)")
    ev.add_argument("--fid-weights", help="pytorch-fid pt_inception-2015-12-05-6726825d.pth for rFID (default: torch hub cache)")
    ev.add_argument("--baselines", action="store_true",
                    help="also encode every file with classical codecs at the tokenizer's bitrate (Codec2 and Opus for "
                         "audio, H.264/H.265 for video, JPEG/WebP and their downscaled variants for images) and compare "
                         "them in report.md; off by default, as it runs several encodes per file (needs c2enc, ffmpeg)")
    sub.add_parser("example-photo", help="print the path of a real photo shipped with matplotlib")
    ex = sub.add_parser("export", help="encode a folder to memory-mappable token shards for AR training (resumable)")
    ex.add_argument("--data", required=True,
                    help="folder of media, or a WebDataset tar shard read without extracting it: a path (shard.tar) or "
                         "a pipe: URL whose command writes the tar (pipe:curl -s https://.../shard.tar); each sample's "
                         "key is kept in the index")
    ex.add_argument("--out", required=True, help="export directory")
    ex.add_argument("--shard-items", type=int, default=256, help="items per shard")
    ex.add_argument("--batch-size", type=int, default=None,
                    help="inputs of equal shape encoded together (default: 16 on a GPU, 1 on the CPU; 4 at --center-crop 256)")
    ex.add_argument("--workers", type=int, default=None,
                    help="processes reading and decoding files while the model encodes (0: none; default: none on "
                         "the CPU, else the cores this process may use but one, up to 15; the shards do not depend on it)")
    ex.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="fp32 (default): the reference ids, for images the same for any CPU thread count (another "
                         "instruction set or a GPU can flip a near-tie; speech's convolutions split sums by thread); "
                         "bf16: the encoder under bf16 autocast, faster on a GPU and 3x on a CPU with bf16 units, "
                         "near-ties may take other ids (recorded in export.json)")
    ex.add_argument("--resize", type=int, metavar="SIDE", help="photos: resized to a shorter side of SIDE pixels first")
    ex.add_argument("--center-crop", action="store_true", help="with --resize: then cut to the central SIDE x SIDE")
    ex.add_argument("--overwrite", action="store_true",
                    help="start over in --out: an earlier export there (its shards, index files, manifest and export.json; "
                         "no other file) is kept in --out/.replaced until the new one finishes, and put back if it fails "
                         "(after a Ctrl-C, by the earlier command); without it, a rerun resumes only an export of the "
                         "same model, inputs and options, and refuses any other, naming it")
    pr = sub.add_parser("prior", help="train the small GPT prior on an export (and sample pictures from an image export)")
    pr.add_argument("--tokens", required=True, help="export directory written by tvq export")
    pr.add_argument("--out", default="runs/prior", help="output folder")
    pr.add_argument("--window", type=int, default=8, help="grid cells per side (frames for audio) per sequence")
    pr.add_argument("--steps", type=int, default=1000, help="training steps (default 1000: under a minute on a "
                    "GPU, over an hour on 2 CPU cores; lower it or set --max-minutes there)")
    pr.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    pr.add_argument("--layers", type=int, default=6, help="transformer layers (default 6)")
    pr.add_argument("--width", type=int, default=256, help="model width; heads of 64 (default 256)")
    pr.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default 0: all)")
    pr.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long (default 0: no limit)")
    for p in (enc, dec, ev, ex, pr):
        p.add_argument("--model", default=None, help=model_help)
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` (default: the process's arguments) parsed; an unknown option exits with the usage of
    its command and where the option goes (argparse's exit code 2)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own usage line, where its options are
        words = sys.argv[1:] if argv is None else list(argv)
        first = next((i for i, w in enumerate(words) if w == unknown[0]), len(words))
        where = ("options go after the command" if first < words.index(args.command) else "overrides go after the "
                 "config" if args.command == "train" else f"tvq {args.command} --help lists its options")
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)} ({where})")
    return args
