"""How often the ids of a CUDA run equal the CPU's, on real media, for each shipped model.

Two measurements per model, both against the CPU's exact search
(:func:`~tokenizers_vq.quantizers._functional.nearest_codes_reference`):

- **search alone**: the quantizer's own inputs (latents of real files, encoded on the
  CPU in fp32, projected and normalised as the quantizer does) searched on the GPU by
  the Triton kernel in each precision: fp32 as the tokenizer calls it (``tf32`` dots),
  fp32 with exact products (``ieee``) and bf16. Every id that differs is checked to be a
  near-tie: its exact (fp64) distance exceeds the CPU winner's by at most the rounding
  bound of that precision, ``2 u (|x|^2 + |c|^2)`` with ``u`` the unit roundoff of the
  dot's inputs (fp32 2^-24, tf32 2^-11, bf16 2^-8), plus the packed kernel's
  ``2^-13`` of the distance (see ``eval/results/kernels/DESIGN.md``).
- **end to end**: ``Tokenizer.encode`` of the same files on the GPU (fp32, the encoder's
  convolutions in TF32 as PyTorch allows by default, and under bf16 autocast) against
  the CPU. Here the latents themselves differ, so a differing id is not a statement about
  the search; the fraction is what a user sees when tokenizing on another device.

Quantizers without a search (FSQ rounds each dimension) report the end-to-end part only.

    python -m tokenizers_vq.eval.id_agreement --images DIR --audio DIR --video DIR --out eval/results/id_agreement
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenizers_vq.media import load_input
from tokenizers_vq.quantizers._functional import l2norm, nearest_codes_reference
from tokenizers_vq.tokenizer import Tokenizer

UNIT_ROUNDOFF = {"ieee": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8}
PACKED_KEY = 2.0**-13  # relative: the packed kernel's integer key keeps 13 mantissa bits


def quantizer_inputs(tok: Tokenizer, x: Tensor) -> tuple[Tensor, Tensor, str] | None:
    """``(queries (N, d), codebook (K, d), metric)`` as the tokenizer's VQ searches them
    on this input, or None for a quantizer without a nearest-code search."""
    q = tok.quantizer
    if not hasattr(q, "metric") or not hasattr(q, "project_in"):
        return None
    captured: list[Tensor] = []
    hook = q.project_in.register_forward_hook(lambda _m, _args, out: captured.append(out.detach()))
    try:
        tok.encode(x)
    finally:
        hook.remove()
    z = torch.cat([c.reshape(-1, q.codebook.shape[1]) for c in captured]).float()
    if q.metric == "cosine":
        z = l2norm(z)
    return z, q.codebook.detach().float(), q.metric


def exact_distance(x: Tensor, c: Tensor, metric: str) -> Tensor:
    """Row-wise distance of ``x`` to ``c`` (same shape) in fp64."""
    x, c = x.double(), c.double()
    if metric == "cosine":
        return 1 - (x * c).sum(-1) / (x.norm(dim=-1) * c.norm(dim=-1)).clamp_min(1e-300)
    return ((x - c) ** 2).sum(-1)


def search_agreement(x: Tensor, cb: Tensor, metric: str, precision: str) -> dict[str, Any]:
    """Triton ids on the GPU in ``precision`` against the CPU reference's."""
    from tokenizers_vq.kernels.nearest import nearest_codes_triton  # noqa: PLC0415

    _, ref = nearest_codes_reference(x, cb, metric)
    xg, cg = x.cuda(), cb.cuda()
    if precision == "bf16":
        xg, cg = xg.bfloat16(), cg.bfloat16()
    _, got = nearest_codes_triton(xg, cg, metric, precision="ieee" if precision == "ieee" else "tf32")
    from tokenizers_vq.kernels import packed_launch  # noqa: PLC0415

    ran_packed = packed_launch.applies(xg.dtype, x.shape[1], metric, "ieee" if precision == "ieee" else "tf32", 1, cb.shape[0])
    return {"precision": precision, "packed": ran_packed,
            **compare_ids(x, cb, metric, ref, got.cpu(), precision, ran_packed)}


def compare_ids(x: Tensor, cb: Tensor, metric: str, ref: Tensor, got: Tensor, precision: str,
                packed: bool = False) -> dict[str, Any]:
    """Agreement of ``got`` with the exact ids ``ref``, and how far each differing id's
    exact distance is from the winner's, against the rounding bound of ``precision``
    (plus the packed kernel's key truncation when ``packed`` ran)."""
    diff = (got != ref).nonzero(as_tuple=True)[0]
    gap = exact_distance(x[diff], cb[got[diff]], metric) - exact_distance(x[diff], cb[ref[diff]], metric)
    scale = x[diff].double().pow(2).sum(-1) + cb[got[diff]].double().pow(2).sum(-1)
    bound = 2 * UNIT_ROUNDOFF[precision] * scale
    if packed:
        bound = bound + PACKED_KEY * exact_distance(x[diff], cb[ref[diff]], metric).abs()
    return {
        "n": int(ref.numel()), "equal": float((got == ref).float().mean()),
        "differing": int(diff.numel()), "within_bound": int((gap <= bound).sum()),
        "max_gap": float(gap.max()) if diff.numel() else 0.0,
        "max_gap_over_bound": float((gap / bound).max()) if diff.numel() else 0.0,
    }


def end_to_end(tok: Tokenizer, inputs: list[Tensor]) -> dict[str, float]:
    """Fraction of ``encode`` ids equal between the CPU (fp32) and the GPU (fp32 and bf16
    autocast)."""
    cpu = [tok.encode(x).flatten() for x in inputs]
    gpu_tok = tok.cuda()
    out: dict[str, float] = {}
    try:
        for name, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                          ("bf16_autocast", torch.autocast("cuda", dtype=torch.bfloat16))):
            with ctx:
                got = [gpu_tok.encode(x.cuda()).flatten().cpu() for x in inputs]
            same = sum(int((a == b).sum()) for a, b in zip(cpu, got))
            out[name] = same / sum(a.numel() for a in cpu)
    finally:
        tok.cpu()
    out["ids"] = sum(a.numel() for a in cpu)
    return out


def measure(name: str, files: list[Path], max_seconds: float = 10.0, max_frames: int = 17) -> dict[str, Any]:
    tok = Tokenizer.from_pretrained(name).eval()
    inputs = []
    for f in files:
        x, _, _ = load_input(f, tok.modality, tok.sample_rate, max_frames)
        if tok.modality == "audio":
            x = x[:, : int(max_seconds * tok.sample_rate)]
        inputs.append(x.unsqueeze(0))
    res: dict[str, Any] = {"model": name, "files": [str(f) for f in files], "end_to_end": end_to_end(tok, inputs)}
    parts = [quantizer_inputs(tok, x) for x in inputs]
    if parts[0] is not None:
        x = torch.cat([p[0] for p in parts])
        cb, metric = parts[0][1], parts[0][2]
        res["search"] = [search_agreement(x, cb, metric, p) for p in ("tf32", "ieee", "bf16")]
        res["metric"], res["queries"], res["codes"] = metric, x.shape[0], cb.shape[0]
    return res


def markdown(results: list[dict[str, Any]], device: str) -> str:
    lines = [f"# CPU vs CUDA ids on real media ({device})", "",
             "Search alone: the quantizer's inputs (computed on the CPU) searched by the Triton kernel, "
             "against the CPU's exact search. A differing id is a near-tie when its exact distance is "
             "within the precision's rounding bound of the CPU winner's.", "",
             "| model | queries | metric | precision | ids equal | differing | near-ties within bound | max gap / bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for s in r.get("search", []):
            lines.append(f"| {r['model']} | {s['n']} | {r['metric']} | {s['precision']} | {100 * s['equal']:.3f}% | "
                         f"{s['differing']} | {s['within_bound']} of {s['differing']} | {s['max_gap_over_bound']:.3f} |")
    lines += ["", "End to end: `Tokenizer.encode` on the GPU against the CPU (the encoder's arithmetic differs too).", "",
              "| model | ids | equal, fp32 (TF32 convolutions) | equal, bf16 autocast |", "|---|---|---|---|"]
    for r in results:
        e = r["end_to_end"]
        lines.append(f"| {r['model']} | {e['ids']} | {100 * e['fp32']:.2f}% | {100 * e['bf16_autocast']:.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, help="folder of photos (the first --n are used)")
    p.add_argument("--audio", type=Path, help="folder of speech files")
    p.add_argument("--video", type=Path, help="a video file or frame folder")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("id_agreement compares CPU and CUDA ids: it needs a GPU")
    from tokenizers_vq.media import list_media  # noqa: PLC0415

    results = []
    for name, src, modality in (("image", args.images, "image"), ("speech", args.audio, "audio"),
                                ("video", args.video, "video")):
        if src is None:
            continue
        files = [src] if src.is_file() else list_media(src, modality)[: args.n]
        results.append(measure(name, files))
        print(json.dumps(results[-1], indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    (args.out / "id_agreement.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
    (args.out / "id_agreement.md").write_text(markdown(results, device))
    assert all(math.isfinite(s["max_gap"]) for r in results for s in r.get("search", []))


if __name__ == "__main__":
    main()
