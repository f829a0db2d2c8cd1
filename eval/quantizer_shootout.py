"""Bottlenecks side by side at the same budget: the image tokenizer at f16 (the shipped
default's backbone) trained with each quantizer in turn on the same photos, for the same
steps, from the same seed, then measured on held-apart photos.

Ours: VQ with an EMA codebook and SimVQ (each with the straight-through and the rotation-trick
estimator), FSQ, LFQ, BSQ and IBQ. vector-quantize-pytorch's
``VectorQuantize``, ``FSQ``, ``LFQ`` and ``SimVQ`` run behind our quantizer contract
through :class:`PeerQuantizer` (an adapter that lives here, not in the library). Every
codebook has 1024 codes (FSQ ``[8, 5, 5, 5]``: 1000), or the ``--codebook-size`` given (256 to
65,536; FSQ with the levels its paper gives for that size). The adversarial loss is off, so the
bottleneck alone separates the runs.

    python -m tokenizers_vq.eval.quantizer_shootout --data ../shared/data/images/bsds500/train \\
        --val ../shared/data/images/bsds500/val --steps 3000 --out eval/results/quantizer_shootout/h200

Writes ``shootout.json``, ``shootout.md`` (held-apart PSNR, SSIM, codebook usage and
perplexity, training step time and peak GPU memory per method) and ``shootout.png``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput

CODEBOOK = 1024
CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "image.yaml"
PEER = "tokenizers_vq.eval.quantizer_shootout:PeerQuantizer"  # the adapter, as a quantizer kind by import path
FSQ_LEVELS_BY_SIZE = {256: [8, 6, 5], 1024: [8, 5, 5, 5], 4096: [7, 5, 5, 5, 5], 16384: [8, 8, 8, 6, 5],
                      65536: [8, 8, 8, 5, 5, 5]}
"""FSQ's levels for about ``2^b`` codes, as the FSQ paper recommends them (arXiv 2309.15505, Table 1)."""


def methods(codebook_size: int = CODEBOOK) -> dict[str, tuple[str, dict[str, Any]]]:
    """method -> (quantizer kind, options) at ``codebook_size`` codes (a key of
    :data:`FSQ_LEVELS_BY_SIZE`; FSQ and FSP take that entry's levels, within 7% as many codes):
    ours, then the peer's layers behind the adapter."""
    if codebook_size not in FSQ_LEVELS_BY_SIZE:
        raise ValueError(f"codebook size {codebook_size}: the shootout runs at {sorted(FSQ_LEVELS_BY_SIZE)} codes "
                         "(powers of two, for LFQ's bits, with FSQ levels the FSQ paper recommends)")
    k, levels, bits = codebook_size, FSQ_LEVELS_BY_SIZE[codebook_size], int(math.log2(codebook_size))
    # dead codes: an EMA count below 2 assignments per step at 1024 codes (the peer's threshold to 1.32, the
    # mean count of a step's 2,048 tokens), the same fraction of the mean count at other sizes
    vq = {"codebook_size": k, "codebook_dim": 16, "metric": "cosine", "kmeans_init": True,
          "dead_code_threshold": 2.0 * CODEBOOK / k, "check_finite": False}
    return {
        "ours-vq-ema": ("vq", vq),
        "ours-fsq": ("fsq", {"levels": levels}),
        "ours-lfq": ("lfq", {"num_bits": bits}),
        "ours-bsq": ("lfq", {"num_bits": bits, "spherical": True}),
        "ours-vq-ema-rot": ("vq", {**vq, "estimator": "rotation"}),  # as the peer's
        "ours-simvq": ("simvq", {"codebook_size": k}),
        "ours-simvq-rot": ("simvq", {"codebook_size": k, "estimator": "rotation"}),  # as the peer's default
        "ours-ibq": ("ibq", {"codebook_size": k}),
        "ours-fsp": ("fsp", {"levels": levels}),
        "ours-binary-mapper": ("binary_mapper", {"bits": bits}),
        "vqp-vq": (PEER, {"method": "vq", "codebook_size": k}),
        "vqp-fsq": (PEER, {"method": "fsq", "codebook_size": math.prod(levels)}),
        "vqp-lfq": (PEER, {"method": "lfq", "codebook_size": k}),
        "vqp-simvq": (PEER, {"method": "simvq", "codebook_size": k}),
        "vqp-fsp": (PEER, {"method": "fsp", "codebook_size": math.prod(levels)}),
        "vqp-binary-mapper": (PEER, {"method": "binary", "codebook_size": k}),
    }


METHODS = methods()


def peer_dead_codes(vqp: Any, codebook_size: int = CODEBOOK) -> dict[str, float]:
    """The peer's dead-code setting: an EMA count of 2 at 1024 codes (the same fraction of the mean
    count at other sizes, as our rows) where ``VectorQuantize`` takes an absolute threshold (up to
    1.32); from 1.34 it takes a ratio of the mean count and reads an
    absolute 2 as ``2 / codebook_size`` of it (almost no restarts: 29% of the codes in use on the
    2-core run), so there the ratio 0.1 that its deprecation warning suggests (``VectorQuantize``'s
    own default, 0, expires none; an absolute 2 is the mean count itself in the GPU shootout, past
    the ratios it accepts, ``< 1``)."""
    ratio = "dead_code_threshold_ratio" in inspect.signature(vqp.VectorQuantize.__init__).parameters
    return {"dead_code_threshold_ratio": 0.1} if ratio else {"threshold_ema_dead_code": 2.0 * CODEBOOK / codebook_size}


class PeerBinaryMapper(torch.nn.Module):
    """vector-quantize-pytorch's ``BinaryMapper`` (bits to a one-hot code) between a projection to
    its logits and a table (a bias-free linear layer on the one-hot code), as a decoder takes it;
    signs in eval, so that a code decodes to its eval output. Returns ``(quantized, codes, loss)``."""

    def __init__(self, vqp: Any, dim: int, bits: int):
        super().__init__()
        self.to_logits, self.table = torch.nn.Linear(dim, bits), torch.nn.Linear(2**bits, dim, bias=False)
        self.mapper = vqp.BinaryMapper(bits=bits, deterministic_on_eval=True)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        one_hot, codes, loss = self.mapper(self.to_logits(z), return_indices=True)
        return self.table(one_hot), codes, loss

    def indices_to_codes(self, codes: Tensor) -> Tensor:
        return self.table(torch.nn.functional.one_hot(codes.long(), self.table.in_features).float())


class PeerQuantizer(Quantizer):
    """A vector-quantize-pytorch layer behind our contract, ``(B, *S, D) -> codes (B, *S)``.

    ``method``: ``"vq"`` (``VectorQuantize`` with an EMA codebook, cosine similarity,
    k-means init, a 16-dim factorised lookup and dead-code expiry, as our default), ``"fsq"``
    and ``"fsp"`` (the levels of :data:`FSQ_LEVELS_BY_SIZE` whose product is ``codebook_size``; FSP from 1.34), ``"binary"`` (:class:`PeerBinaryMapper`,
    from 1.34), ``"lfq"`` or ``"simvq"``; its own losses come back as
    ``losses["peer"]``."""

    def __init__(self, dim: int, method: str = "vq", codebook_size: int = CODEBOOK):
        super().__init__(dim, check_finite=False)
        import vector_quantize_pytorch as vqp  # noqa: PLC0415  (a peer: benchmark only)

        self.method, self._size = method, codebook_size
        levels = next((v for v in FSQ_LEVELS_BY_SIZE.values() if math.prod(v) == codebook_size), None)
        if method in ("fsq", "fsp") and levels is None:
            raise ValueError(f"no FSQ levels give {codebook_size} codes here: use one of "
                             f"{sorted(math.prod(v) for v in FSQ_LEVELS_BY_SIZE.values())}")
        if method == "vq":
            self.layer = vqp.VectorQuantize(dim=dim, codebook_size=codebook_size, codebook_dim=16, use_cosine_sim=True,
                                            kmeans_init=True, decay=0.99, commitment_weight=0.25, **peer_dead_codes(vqp, codebook_size))
        elif method == "fsq":
            self.layer = vqp.FSQ(levels=levels, dim=dim)
        elif method == "fsp":
            if not hasattr(vqp, "FSP"):
                raise ValueError(f"vector-quantize-pytorch {importlib.metadata.version('vector-quantize-pytorch')} has no "
                                 "FSP: it came in 1.34 (pip install -U vector-quantize-pytorch)")
            self.layer = vqp.FSP(levels=levels, dim=dim)
        elif method == "binary":
            self.layer = PeerBinaryMapper(vqp, dim, int(math.log2(codebook_size)))
        elif method == "lfq":
            self.layer = vqp.LFQ(dim=dim, codebook_size=codebook_size)
        elif method == "simvq":
            self.layer = vqp.SimVQ(dim=dim, codebook_size=codebook_size)
        else:
            raise ValueError(f"unknown peer method {method!r}: vq, fsq, fsp, binary, lfq or simvq")

    @property
    def codebook_size(self) -> int:
        return self._size

    def _forward(self, z: Tensor) -> QuantizerOutput:
        lead = z.shape[:-1]
        out = self.layer(z.reshape(lead[0], -1, z.shape[-1]))
        losses = {"peer": out[2].sum()} if len(out) > 2 and isinstance(out[2], Tensor) else {}
        return QuantizerOutput(out[0].reshape(z.shape).to(z.dtype), out[1].reshape(lead).long(), losses, {})

    def _decode(self, codes: Tensor) -> Tensor:
        flat = codes.reshape(codes.shape[0], -1)
        out = self.layer.get_output_from_indices(flat) if self.method == "vq" else self.layer.indices_to_codes(flat)
        return out.reshape(*codes.shape, out.shape[-1])


def train(method: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Train one bottleneck (``tvq train`` in a child process); its training summary."""
    kind, options = args.table[method]
    out_dir = args.scratch / method  # a fresh folder: nothing to resume
    overrides = {"model.quantizer.kind": kind, "model.quantizer.options": json.dumps(options),
                 "model.name": f"shootout-{method}", "model.backbone.channels": 64, "data.train": args.data,
                 "data.val": "", "data.max_items": args.max_items, "data.crop": args.crop, "loss.adversarial": 0,
                 "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "sample_every": 0,
                 "save_every": args.steps, "out_dir": out_dir, "log_every": 50,
                 "mixed_precision": "bf16" if device == "cuda" else "no"}
    cmd = [sys.executable, "-m", "tokenizers_vq.cli", "train", str(CONFIG), *(f"--{k}={v}" for k, v in overrides.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training {method} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out_dir / "train_summary.json").read_text())
    if summary["steps"] != args.steps or not summary["steps_per_s"] > 0:
        raise RuntimeError(f"training {method} ran {summary['steps']} of {args.steps} steps")
    return summary


def measure(method: str, summary: dict[str, Any], args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The trained bottleneck on the held-apart photos, with its training figures."""
    from tokenizers_vq.eval.evaluate import evaluate  # noqa: PLC0415
    from tokenizers_vq.media import list_media  # noqa: PLC0415
    from tokenizers_vq.tokenizer import Tokenizer  # noqa: PLC0415

    kind, options = args.table[method]
    tok = Tokenizer.from_pretrained(args.scratch / method / "checkpoint" / "model").to(device)
    res = evaluate(tok, list_media(args.val, "image", args.val_items))["summary"]
    peak = summary.get("peak_memory_mib")
    return {"method": method, "kind": kind, "options": options, "steps": summary["steps"],
            "step_ms": 1000 / summary["steps_per_s"], "train_peak_mib": float("nan") if peak is None else peak,
            "psnr_db": res["psnr_db"], "ssim": res["ssim"], "usage": res["usage"], "perplexity": res["perplexity"],
            "codebook_size": tok.quantizer.codebook_size}


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "shootout.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Quantizer shootout ({meta['device_name']}, {meta['steps']} steps each)", "",
             f"Image tokenizer at f16, batch {meta['batch_size']}, crop {meta['crop']}, seed {meta['seed']}, no GAN, "
             f"{meta.get('codebook_size', CODEBOOK)} codes (FSQ/FSP: the paper's levels); "
             f"{meta.get('parallel', 1)} training(s) at a time on the device (step times include that sharing); "
             f"held-apart: {meta['val_items']} photos of `{meta['val']}`. Command: `{meta['command']}`", "",
             "| method | codes | PSNR dB | SSIM | usage | perplexity | step ms | train peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | - | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['codebook_size']} | {r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['usage']:.1%} | "
                     f"{r['perplexity']:.0f} | {r['step_ms']:.1f} | {r['train_peak_mib']:.0f} |")
    (out / "shootout.md").write_text("\n".join(lines) + "\n")
    ok = [r for r in rows if "error" not in r]
    if ok:
        _chart(ok, meta, out / "shootout.png")


def _chart(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """Held-apart PSNR and codebook usage per method, ours and the peer's in two colours."""
    from tokenizers_vq.io import atomic_write  # noqa: PLC0415
    from tokenizers_vq.viz import _pyplot  # noqa: PLC0415

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    names = [r["method"] for r in rows]
    colours = ["tab:orange" if r.get("kind") == PEER else "tab:blue" for r in rows]
    for ax, key, label in ((axes[0], "psnr_db", "held-apart PSNR (dB)"), (axes[1], "usage", "codebook usage")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colours)
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
        ax.set_ylabel(label)
    fig.suptitle(f"f16 image tokenizer, {meta['steps']} steps per bottleneck ({meta['device_name']})")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="training photos")
    p.add_argument("--val", required=True, help="held-apart photos")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--max-items", type=int, default=0)
    p.add_argument("--val-items", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codebook-size", type=int, default=CODEBOOK, choices=sorted(FSQ_LEVELS_BY_SIZE),
                   help="codes of every bottleneck (FSQ and FSP: the paper's levels for it, within 7%% as many)")
    p.add_argument("--parallel", type=int, default=1,
                   help="trainings at once on the device (step times then include the sharing)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:JSON",
                   help="one more method: METHOD's quantizer with the options in JSON changed, e.g. "
                        "'ours-vq-ema-decay0.9=ours-vq-ema:{\"decay\": 0.9}' (repeatable; put NAME in --methods)")
    args = p.parse_args(argv)
    try:
        args.table = with_variants(methods(args.codebook_size), args.variant)
    except ValueError as e:
        p.error(str(e))
    names = args.methods.split(",")
    if args.parallel < 1 or len(set(names)) != len(names) or not set(names) <= set(args.table):
        p.error(f"--parallel must be >= 1 and --methods distinct names of {', '.join(args.table)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {"device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU", "torch": torch.__version__,
            "steps": args.steps, "batch_size": args.batch_size, "crop": args.crop, "seed": args.seed,
            "parallel": args.parallel, "codebook_size": args.codebook_size,
            "val": args.val, "val_items": args.val_items,
            "command": "python -m tokenizers_vq.eval.quantizer_shootout " + " ".join(sys.argv[1:] if argv is None else argv)}
    with tempfile.TemporaryDirectory(prefix="tvq-shootout-") as scratch:  # the runs' checkpoints, not results
        args.scratch = Path(scratch)
        _run_all(args, device, meta)


def with_variants(table: dict[str, tuple[str, dict[str, Any]]],
                  variants: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``table`` and one more method per ``"NAME=METHOD:JSON"``: METHOD's kind and options,
    updated with the JSON object's."""
    out = dict(table)
    for spec in variants:
        name, sep, rest = spec.partition("=")
        base, sep2, options = rest.partition(":")
        if not (sep and sep2 and name) or name in out or base not in table:
            raise ValueError(f"--variant {spec!r}: expected NEW_NAME=METHOD:JSON with METHOD one of {', '.join(table)}")
        try:
            extra = json.loads(options)
        except json.JSONDecodeError as e:
            raise ValueError(f"--variant {spec!r}: the options are not JSON ({e})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--variant {spec!r}: the options must be a JSON object")
        kind, base_options = table[base]
        out[name] = (kind, {**base_options, **extra})
    return out


def _run_all(args: argparse.Namespace, device: str, meta: dict[str, Any]) -> None:
    """Train and measure every method of ``args.methods``, writing the table after each."""
    rows = []
    methods = args.methods.split(",")
    # waves of --parallel trainings (child processes); each wave is measured once it has
    # finished, so no training shares the device with a measurement
    for i in range(0, len(methods), args.parallel):
        wave = methods[i : i + args.parallel]
        with ThreadPoolExecutor(max_workers=len(wave)) as pool:
            trainings = [pool.submit(_timed, train, m, args, device) for m in wave]
        for method, future in zip(wave, trainings):
            try:
                summary, seconds = future.result()
                t0 = time.perf_counter()
                rows.append(measure(method, summary, args, device))
                rows[-1]["wall_s"] = seconds + time.perf_counter() - t0
            except RuntimeError as e:
                if "No module named 'vector_quantize_pytorch'" not in str(e):
                    raise
                rows.append({"method": method, "error": "skipped: vector-quantize-pytorch is not installed"})
            write(rows, meta, args.out)  # after each method: a cut-off run keeps what it measured
            print(json.dumps(rows[-1]), flush=True)


def _timed(fn, *args):
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


if __name__ == "__main__":
    main()
