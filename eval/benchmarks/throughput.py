"""Throughput of the shipped tokenizers, encode and decode apart, on this machine.

For each embedded model (``image``, ``speech``, ``video``) and batch size: images per
second (256 x 256), seconds of audio per second (10 s clips, 16 kHz) or frames per second
(17-frame clips, 256 x 256), for ``encode`` and for ``decode`` of its codes, in fp32 and
under bf16 autocast (and ``torch.compile`` of both with ``--compile``, or with
``--compile image,speech`` for those models only; the image and video models with weights
and inputs channels-last too with ``--channels-last``). On a GPU the peak
memory of each is recorded too. Inputs are random media of the model's shape: the cost
of these convolutional models does not depend on the content.

``--peers`` adds rows of outside models of the same class, with random weights, timed the
same way where they import: EnCodec 24 kHz (PyPI ``encodec``, 1.5 kbps) for speech, and our
image backbone with vector-quantize-pytorch's ``VectorQuantize`` (same codebook size, code
dim and metric) in place of our quantizer.

    python -m tokenizers_vq.eval.benchmarks.throughput --out eval/results/throughput
    python -m tokenizers_vq.eval.benchmarks.throughput --device cuda --batches 1,16,64 --compile --peers --out ...

Writes ``throughput.json`` and ``throughput.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tokenizers_vq.runtime import keep_freed_memory
from tokenizers_vq.tokenizer import Tokenizer

INPUTS = {"image": (3, 256, 256), "speech": (1, 160000), "video": (3, 17, 256, 256)}
UNIT = {"image": ("images", 1.0), "speech": ("audio s", 10.0), "video": ("frames", 17.0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, min_seconds: float, max_reps: int) -> float:
    """Seconds per call: warm-up calls for ``min_seconds`` on a GPU (one on the CPU), in which
    its clocks and libraries settle, then calls until ``min_seconds`` have passed (at least 2, at most ``max_reps``), the median."""
    start = time.perf_counter()
    while True:
        fn()
        _sync(device)
        if time.perf_counter() - start >= min_seconds or device.type != "cuda":
            break
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _row(label: str, name: str, shape: tuple[int, ...], enc, dec, batch: int, precision: str, device: torch.device,
         compile_: bool, min_seconds: float, max_reps: int, channels_last: bool = False) -> dict[str, Any]:
    """Time ``enc`` on a random batch of ``shape`` (channels-last with ``channels_last``) and
    ``dec`` on its codes: rates in ``name``'s units per second, and the peak memory on a GPU."""
    torch.manual_seed(0)
    x = (torch.rand(batch, *shape, device=device) * 2 - 1) * (0.1 if name == "speech" else 1.0)
    if channels_last:
        x = x.contiguous(memory_format=_channels_last(x.ndim))
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    with torch.inference_mode(), ctx:
        codes = enc(x)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_enc = timed(lambda: enc(x), device, min_seconds, max_reps)
        t_dec = timed(lambda: dec(codes), device, min_seconds, max_reps)
    unit, per_item = UNIT[name]
    row = {"model": label, "batch": batch, "precision": precision, "compile": compile_,
           "channels_last": channels_last, "unit": unit,
           "encode_per_s": batch * per_item / t_enc, "decode_per_s": batch * per_item / t_dec,
           "both_per_s": batch * per_item / (t_enc + t_dec)}
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def _channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def measure(name: str, batch: int, precision: str, device: torch.device, compile_: bool = False,
            min_seconds: float = 2.0, max_reps: int = 20, channels_last: bool = False) -> dict[str, Any]:
    """One row: encode and decode rates (units per second) and peak memory. ``channels_last``
    (images and video): the weights and the input batch in that layout."""
    tok = Tokenizer.from_pretrained(name).eval().to(device)
    channels_last = channels_last and len(INPUTS[name]) > 2
    if channels_last:
        tok = tok.to(memory_format=_channels_last(len(INPUTS[name]) + 1))
    enc, dec = tok.encode, tok.decode
    if compile_:
        enc, dec = torch.compile(tok.encode), torch.compile(tok.decode)
    size = tuple(INPUTS[name][1:])
    return _row(name, name, INPUTS[name], enc, lambda codes: dec(codes, size), batch, precision, device, compile_,
                min_seconds, max_reps, channels_last)


def _peer(name: str, device: torch.device):
    """``(label, encode, decode)`` of the outside model for ``name``'s rows, or ``None``
    where it does not import."""
    if name == "speech":
        try:
            from encodec import EncodecModel  # noqa: PLC0415
        except (ImportError, OSError):  # OSError: a torchaudio built for another torch
            return None
        model = EncodecModel.encodec_model_24khz(pretrained=False).eval().to(device)
        model.set_target_bandwidth(1.5)
        return ("EnCodec 24 kHz, 1.5 kbps (random weights)", lambda x: model.encode(x),
                lambda frames: model.decode(frames))
    if name == "image":
        try:
            from vector_quantize_pytorch import VectorQuantize  # noqa: PLC0415
        except ImportError:
            return None
        tok = Tokenizer.from_pretrained("image").eval().to(device)
        opts = tok.config.quantizer.options
        vq = VectorQuantize(dim=tok.backbone_config.latent_dim, codebook_size=opts["codebook_size"],
                            codebook_dim=opts.get("codebook_dim"),
                            use_cosine_sim=opts.get("metric") == "cosine").eval().to(device)
        def encode(x):
            h = tok.encoder(x).movedim(1, -1)  # (B, H, W, D); theirs takes (B, N, D)
            return vq(h.flatten(1, 2))[1].view(h.shape[:3])

        def decode(idx):
            return tok.decoder(vq.get_output_from_indices(idx.flatten(1)).view(*idx.shape, -1).movedim(-1, 1))

        return "our image backbone + vector-quantize-pytorch VQ (random codebook)", encode, decode
    return None


def measure_peer(name: str, batch: int, precision: str, device: torch.device,
                 min_seconds: float = 2.0, max_reps: int = 20) -> dict[str, Any] | None:
    """A row like :func:`measure` for the outside model of ``name`` (None if absent)."""
    peer = _peer(name, device)
    if peer is None:
        return None
    label, enc, dec = peer
    shape = (1, 240000) if name == "speech" else INPUTS[name]  # EnCodec takes 24 kHz: 10 s
    return _row(f"{name} peer: {label}", name, shape, enc, dec, batch, precision, device, False, min_seconds, max_reps)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Tokenizer throughput ({meta['device_name']})", "",
             f"torch {meta['torch']}, {meta['threads']} CPU threads. Units per second: images (256 x 256), "
             "seconds of 16 kHz audio, frames ({} x {}{}); encode and decode apart, and the two in sequence.".format(
                 *meta.get("video_size", (256, 256)), {None: "", 0: ", whole clips"}.get(
                     meta.get("chunk_pixels"), f", CHUNK_PIXELS {meta.get('chunk_pixels')}"))
             + (" Freed memory kept in the process (`tokenizers_vq.runtime.keep_freed_memory`, as `tvq` does)."
                if meta.get("keep_freed_memory") else ""), "",
             "| model | batch | precision | compile | channels-last | encode | decode | encode + decode | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | - | - | failed: {r['error'][:80]} | | | |")
            continue
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | "
                     f"{'yes' if r.get('channels_last') else 'no'} | "
                     f"{r['encode_per_s']:.1f} {r['unit']}/s | {r['decode_per_s']:.1f} | {r['both_per_s']:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="image,speech,video")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", nargs="?", const="all", default="",
                   help="also time torch.compile'd encode and decode (of all models, or of those named: image,speech)")
    p.add_argument("--peers", action="store_true", help="also time the outside models of the same class")
    p.add_argument("--channels-last", nargs="?", const="all", default="",
                   help="also time the image and video models with weights and inputs channels-last (all, or those "
                        "named), compiled too where --compile names them")
    p.add_argument("--video-size", default="256x256", help="HxW of the video frames (default 256x256)")
    p.add_argument("--chunk-pixels", type=int, default=None,
                   help="frames x pixels the video model's full-resolution layers take at once, on any device "
                        "(tokenizers_vq.backbones.time_chunks.CHUNK_PIXELS; 0: whole clips, whatever their size)")
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--malloc-defaults", action="store_true",
                   help="on the CPU, leave glibc's malloc as it is (default: keep_freed_memory, as tvq does)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    h, w = (int(v) for v in args.video_size.lower().split("x"))
    INPUTS["video"] = (3, 17, h, w)
    if args.chunk_pixels is not None:
        from tokenizers_vq.backbones import time_chunks  # noqa: PLC0415

        time_chunks.CHUNK_PIXELS = dict.fromkeys(time_chunks.CHUNK_PIXELS, args.chunk_pixels or 1 << 62)
    kept = device.type == "cpu" and not args.malloc_defaults and keep_freed_memory()
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device), "keep_freed_memory": kept,
            "video_size": [h, w], "chunk_pixels": args.chunk_pixels,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"}
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every row too: a cut run keeps what it measured
        (args.out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for precision in args.precisions.split(","):
                compiled = args.compile == "all" or name in args.compile.split(",")
                layouts = (False, True) if name != "speech" and (args.channels_last == "all"
                                                                   or name in args.channels_last.split(",")) else (False,)
                for channels_last in layouts:
                    for compile_ in (False, True) if compiled else (False,):
                        rows.append(measure(name, batch, precision, device, compile_, args.min_seconds,
                                            channels_last=channels_last))
                        print(json.dumps(rows[-1]), flush=True)
                if args.peers:
                    try:
                        row = measure_peer(name, batch, precision, device, args.min_seconds)
                    except Exception as e:  # noqa: BLE001  (recorded; the run goes on)
                        row = {"model": f"{name} peer", "batch": batch, "precision": precision, "error": repr(e)[:300]}
                    if row:
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                write()
    write()
    (args.out / "throughput.md").write_text(markdown(meta, rows))
    if rows:
        from tokenizers_vq.eval.benchmarks.plots import throughput_plot  # noqa: PLC0415

        throughput_plot({"meta": meta, "rows": rows}, args.out / "throughput.png")
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
