"""How fast ``tvq export`` tokenizes a photo collection, and what bounds it.

Three rates on the same files, items per second:

- decode-bound: the export's reader alone (files read and decoded in ``--workers``
  loader processes, as the export runs them; no model);
- encode-bound: the model alone on inputs already decoded and batched as the export
  batches them (``--batch-size`` photos of one shape; fp32 and bf16 autocast);
- end to end: :func:`~tokenizers_vq.export.export_dataset` into a temporary folder, at
  each precision (``--precision``); and the same export once running: the items of the
  shards after the first quarter of them over the time from the end of that quarter to the
  last shard (starting loader workers and the first batches' kernel choices left out);
- ``tvq export`` in a process of its own, as a user runs it: the rate it prints (its clock
  starts after the model is loaded; the loaders' start and the first encode's library
  start-up are inside it, from a process that has done nothing else).

The export can be no faster than the slower of the first two. ``--repeat R`` lists every
file ``R`` times (links in one temporary folder, which ``tvq export`` reads) to make a
larger set.

    python -m tokenizers_vq.eval.benchmarks.export_speed ../shared/data/images/bsds500/val \\
        --max-items 32 --repeat 8 --device cpu --out eval/results/export_speed/cpu_2core

Writes ``export_speed.json`` and ``export_speed.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tokenizers_vq.export import default_batch_size, default_workers, export_dataset, usable_cores
from tokenizers_vq.export_pipeline import read_inputs
from tokenizers_vq.media import list_media
from tokenizers_vq.runtime import keep_freed_memory
from tokenizers_vq.tokenizer import Tokenizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(tok: Tokenizer, files: list[Path], workers: int, batch_size: int, fit: tuple[int, bool] | None = None) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in read_inputs(tok, files, workers, batch_size, fit))
    return n / (time.perf_counter() - start)


def encode_rate(tok: Tokenizer, files: list[Path], batch_size: int, precision: str, device: torch.device,
                fit: tuple[int, bool] | None = None) -> float:
    """Items/s of ``tok.encode`` over batches of equal-shape inputs, decoded beforehand."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for _, (x, _, _) in read_inputs(tok, files, 0, fit=fit):
        groups.setdefault(tuple(x.shape), []).append(x)
    batches = [torch.stack(g[i : i + batch_size]).to(device) for g in groups.values() for i in range(0, len(g), batch_size)]
    batches = [tok.media.expand(b) for b in batches]  # the export's compact inputs (images: uint8) as model input
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        tok.encode(batches[0])  # warm-up
        _sync(device)
        start = time.perf_counter()
        for b in batches:
            tok.encode(b)
        _sync(device)
    return sum(b.shape[0] for b in batches) / (time.perf_counter() - start)


def export_rates(tok: Tokenizer, files: list[Path], out: Path, **options) -> dict[str, float]:
    """One timed export: ``per_s`` (items/s of the whole export), ``running_per_s`` (items/s
    once running: NaN with fewer than 4 shards), and the start-up in seconds from the
    export's call: ``first_read_s`` (the reader's first decoded item; the claim of the
    folder and the loader workers' start come before it), ``first_encoded_s`` (the first
    encoded batch handed on), ``first_shard_s``, and ``later_shard_s`` (median seconds
    between later shards)."""
    from tokenizers_vq import export  # noqa: PLC0415

    marks, firsts = [], {}
    write, read, encode = export._write_shard, export.read_inputs, export.encode_batches

    def timed_write(*args, **kwargs):  # (tok, out, k, chunk, ...): each shard's items and when it was written
        write(*args, **kwargs)
        marks.append((time.perf_counter(), len(args[3])))

    def first_timed(name, fn):
        def run(*args, **kwargs):
            for item in fn(*args, **kwargs):
                firsts.setdefault(name, time.perf_counter())
                yield item
        return run

    export._write_shard = timed_write
    export.read_inputs, export.encode_batches = first_timed("read", read), first_timed("encoded", encode)
    try:
        start = time.perf_counter()
        export_dataset(tok, files, out, **options)
        total = time.perf_counter() - start
    finally:
        export._write_shard, export.read_inputs, export.encode_batches = write, read, encode
    q = len(marks) // 4
    steady = sum(n for _, n in marks[q:]) / (marks[-1][0] - marks[q - 1][0]) if q > 0 else float("nan")
    gaps = sorted(b[0] - a[0] for a, b in zip(marks, marks[1:]))
    nan = float("nan")
    return {"per_s": len(files) / total, "running_per_s": steady,
            "first_read_s": firsts.get("read", nan) - start, "first_encoded_s": firsts.get("encoded", nan) - start,
            "first_shard_s": marks[0][0] - start if marks else nan, "later_shard_s": gaps[len(gaps) // 2] if gaps else nan}


def cli_rate(args: argparse.Namespace, folder: Path, out: Path, precision: str) -> float:
    """Items/s that ``tvq export`` prints when run in a process of its own on ``folder``, as
    a user runs it: the process starts and loads the model before its clock starts; the
    loader workers' start and the GPU libraries' first-call costs are inside it."""
    cmd = [sys.executable, "-m", "tokenizers_vq.cli", "export", "--data", str(folder), "--out", str(out),
           "--model", args.model, "--device", args.device, "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--shard-items", str(args.shard_items), "--precision", precision]
    if args.resize:
        cmd += ["--resize", str(args.resize)] + (["--center-crop"] if args.center_crop else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"\(([0-9.]+) items/s", proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"tvq export failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return float(found.group(1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="folder of photos")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-items", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="list every file this many times")
    p.add_argument("--workers", type=int, default=None, help="default: the export's (none on the CPU, else the usable cores but one, up to 15)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the export's (16 on a GPU, 1 on the CPU)")
    p.add_argument("--shard-items", type=int, default=256, help="files per shard (the export's default)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: the passes to time (fp32, bf16)")
    p.add_argument("--resize", type=int, default=None, help="photos resized to this shorter side first (tvq export --resize)")
    p.add_argument("--center-crop", action="store_true", help="with --resize: cut to the central square")
    args = p.parse_args(argv)
    precisions = list(dict.fromkeys(q for q in args.precisions.split(",") if q))  # each once
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        p.error(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")
    device = torch.device(args.device)
    kept = device.type == "cpu" and keep_freed_memory()  # as tvq and the export itself do on the CPU
    tok = Tokenizer.from_pretrained(args.model).eval().to(device)
    fit = (args.resize, args.center_crop) if args.resize else None
    if args.batch_size is None:
        args.batch_size = default_batch_size(tok, fit)
    if args.workers is None:
        args.workers = default_workers(tok)
    files = list_media(args.data, tok.modality, args.max_items)
    with tempfile.TemporaryDirectory(prefix="tvq-export-speed-") as tmp:
        folder = Path(tmp) / "in"  # links (the same bytes under other names with --repeat), for tvq export too
        folder.mkdir()
        links = []
        for r in range(args.repeat):
            for i, f in enumerate(files):  # names unique even for equal names in subfolders
                links.append(folder / f"{r:04d}_{i:06d}_{f.name}")
                links[-1].symlink_to(f.resolve())
        files = links
        row = {"items": len(files), "workers": args.workers, "batch_size": args.batch_size,
               "decode_bound_per_s": decode_rate(tok, files, args.workers, args.batch_size, fit)}
        for precision in precisions:
            row[f"encode_bound_{precision}_per_s"] = encode_rate(tok, files, args.batch_size, precision, device, fit)
        for precision in precisions:
            rates = export_rates(tok, files, Path(tmp) / f"out_{precision}", batch_size=args.batch_size,
                                 workers=args.workers, precision=precision, shard_items=args.shard_items,
                                 resize=args.resize, center_crop=args.center_crop)
            row[f"end_to_end_{precision}_per_s"] = rates.pop("per_s")
            row[f"running_{precision}_per_s"] = rates.pop("running_per_s")
            row.update({f"{k[:-2]}_{precision}_s": v for k, v in rates.items()})
            row[f"tvq_export_{precision}_per_s"] = cli_rate(args, folder, Path(tmp) / f"cli_{precision}", precision)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cores": usable_cores(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
            "model": tok.config.name, "data": args.data, "keep_freed_memory": kept,
            "resize": args.resize, "center_crop": args.center_crop}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_speed.json").write_text(json.dumps({"meta": meta, "row": row}, indent=1))
    nan = float("nan")
    for q in ("fp32", "bf16"):  # a precision left out shows as nan
        for k in ("encode_bound_{}_per_s", "end_to_end_{}_per_s", "running_{}_per_s", "tvq_export_{}_per_s",
                  "first_shard_{}_s", "later_shard_{}_s", "first_read_{}_s", "first_encoded_{}_s"):
            row.setdefault(k.format(q), nan)
    md = (f"# tvq export speed ({meta['device_name']}, {meta['cores']} usable cores, {meta['threads']} threads)\n\n"
          f"{row['items']} files of `{args.data}`, model `{meta['model']}`, {args.workers} loader worker(s), "
          f"batches of {args.batch_size}"
          + (f", resized to a shorter side of {args.resize}" + (" and cut to the central square" if args.center_crop else "")
             if args.resize else "") + "; items per second.\n\n"
          "| decode-bound (reader alone) | encode-bound fp32 (model alone) | encode-bound bf16 | end to end fp32 "
          "(in this process) | end to end bf16 (`--precision bf16`) | once running fp32 | once running bf16 | "
          "`tvq export` in its own process fp32 / bf16 |\n"
          "|---|---|---|---|---|---|---|---|\n"
          f"| {row['decode_bound_per_s']:.1f} | {row['encode_bound_fp32_per_s']:.1f} | "
          f"{row['encode_bound_bf16_per_s']:.1f} | {row['end_to_end_fp32_per_s']:.1f} | "
          f"{row['end_to_end_bf16_per_s']:.1f} | {row['running_fp32_per_s']:.1f} | {row['running_bf16_per_s']:.1f} | "
          f"{row['tvq_export_fp32_per_s']:.1f} / {row['tvq_export_bf16_per_s']:.1f} |\n"
          f"\n{args.shard_items} files per shard; \"once running\": the shards after the first quarter of them. "
          f"Start-up: the first shard was written {row['first_shard_fp32_s']:.2f} s (fp32) / "
          f"{row['first_shard_bf16_s']:.2f} s (bf16) after the export began; a later shard took "
          f"{row['later_shard_fp32_s']:.2f} / {row['later_shard_bf16_s']:.2f} s (median). Before the first shard: "
          f"the reader's first item at {row['first_read_fp32_s']:.2f} / {row['first_read_bf16_s']:.2f} s, the first "
          f"encoded batch at {row['first_encoded_fp32_s']:.2f} / {row['first_encoded_bf16_s']:.2f} s.\n")
    (args.out / "export_speed.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
