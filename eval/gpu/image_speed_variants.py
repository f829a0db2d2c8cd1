"""The shipped image tokenizer's 256 x 256 encode + decode rate on a GPU under the settings
that decide it: bf16 autocast, channels-last weights and inputs, cuDNN's own kernel timing
(``torch.backends.cudnn.benchmark``) and ``torch.compile``, one variant at a time in one
process, batch 64, the codes of each variant checked against the first one's.

    python eval/gpu/image_speed_variants.py [--variants eager,eager-cl-tuned,compiled,compiled-cl-tuned]

Prints one JSON line per variant: images/s for encode, decode and both in sequence.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenizers_vq import Tokenizer

VARIANTS = {  # name: (channels-last, cudnn.benchmark, compile)
    "eager": (False, False, False),
    "eager-cl": (True, False, False),
    "eager-cl-tuned": (True, True, False),
    "compiled": (False, False, True),
    "compiled-cl": (True, False, True),
    "compiled-cl-tuned": (True, True, True),
}


def rate(fn, n: int, min_seconds: float = 1.0) -> float:
    fn()
    torch.cuda.synchronize()
    reps, t = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t < min_seconds:
        fn()
        reps += 1
    torch.cuda.synchronize()
    return n * reps / (time.perf_counter() - t)


def run(name: str, batch: int, x: torch.Tensor, reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    cl, tuned, compiled = VARIANTS[name]
    torch.backends.cudnn.benchmark = tuned
    tok = Tokenizer.from_pretrained("image").eval().cuda()
    fmt = torch.channels_last if cl else torch.contiguous_format
    tok = tok.to(memory_format=fmt)
    xin = x.contiguous(memory_format=fmt)
    enc = torch.compile(tok.encode) if compiled else tok.encode
    dec = torch.compile(tok.decode) if compiled else tok.decode
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        codes = enc(xin)
        dec(codes)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        e = rate(lambda: enc(xin), batch)
        d = rate(lambda: dec(codes), batch)
        both = rate(lambda: dec(enc(xin)), batch)
    row = {"variant": name, "channels_last": cl, "cudnn_benchmark": tuned, "compile": compiled, "batch": batch,
           "encode_per_s": round(e, 1), "decode_per_s": round(d, 1), "encode_decode_per_s": round(both, 1),
           "first_call_s": round(warm, 1)}
    if reference is not None:
        row["codes_equal_first_variant"] = float((codes == reference).float().mean())
    return row, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="eager,eager-cl-tuned,compiled,compiled-cl-tuned")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = (torch.rand(args.batch, 3, 256, 256, device="cuda") * 2 - 1)
    reference = None
    for name in args.variants.split(","):
        row, codes = run(name, args.batch, x, reference)
        reference = codes if reference is None else reference
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
