"""Where an export's start-up goes on a GPU machine: the time from creating the reader to
its first decoded photo with the loader workers forked before and after CUDA is in use
(and the model on the GPU), the first pinned-memory batch, and the first encode.

    python eval/gpu/export_startup.py FOLDER [--workers 7] [--repeat 40]

Prints one JSON object of seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokenizers_vq import Tokenizer
from tokenizers_vq.export_pipeline import read_inputs
from tokenizers_vq.media import list_media


def first_item_s(tok: Tokenizer, files: list[Path], workers: int) -> float:
    """Seconds from creating the reader to its first item (the workers' start included)."""
    t = time.perf_counter()
    reader = read_inputs(tok, files, workers)
    next(reader)
    s = time.perf_counter() - t
    reader.close()
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--workers", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    tok = Tokenizer.from_pretrained("image").eval()
    files = list_media(args.folder, "image") * args.repeat
    row = {"workers": args.workers, "files": len(files)}
    row["reader_first_item_before_cuda_s"] = first_item_s(tok, files, args.workers)
    row["reader_first_item_before_cuda_again_s"] = first_item_s(tok, files, args.workers)
    t = time.perf_counter()
    tok = tok.to("cuda")
    torch.cuda.synchronize()
    row["model_to_cuda_s"] = time.perf_counter() - t
    x, _, _ = next(read_inputs(tok, files[:1], 0))[1]
    batch = tok.media.expand(torch.stack([x] * 16))
    for name in ("first_encode_s", "second_encode_s"):
        t = time.perf_counter()
        with torch.inference_mode():
            tok.encode(batch.cuda())
        torch.cuda.synchronize()
        row[name] = time.perf_counter() - t
    for name in ("first_pinned_batch_s", "second_pinned_batch_s"):
        t = time.perf_counter()
        torch.empty((16, *x.shape), dtype=x.dtype, pin_memory=True)
        row[name] = time.perf_counter() - t
    row["reader_first_item_after_cuda_s"] = first_item_s(tok, files, args.workers)
    row["reader_first_item_after_cuda_again_s"] = first_item_s(tok, files, args.workers)
    row["resident_mib"] = int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
