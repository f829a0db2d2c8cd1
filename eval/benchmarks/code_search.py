"""Genetic code search through a decoder: ours (:func:`tokenizers_vq.evolve.evolve_tokens`) against
vector-quantize-pytorch's ``EvoLFQ``, on an LFQ image tokenizer, at equal decodings.

An LFQ image tokenizer is trained here for a few hundred steps (``tvq train``, the shootout's setting)
or loaded (``--model DIR``). For each held-apart photo (a centre crop), both searches start from the
same first generation (the encoder's codes and mutated copies of them), score each code map by the
PSNR of its decoding against the photo, and get the same number of decodings. The peer's search runs
on the codes' bits through a bijection to our code ids, with our decoder behind it. Reported per
photo: the PSNR of the encoder's codes, our best, the peer's reported best, and the PSNR of the code
map the peer returns with it (measured again here).

    python -m tokenizers_vq.eval.benchmarks.code_search --data TRAIN --val VAL --out DIR [--steps 400]

Writes ``code_search.json``, ``code_search.md`` and ``code_search.png`` (best PSNR per generation, and
one photo with its encoder's and the search's decodings).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """PSNR in dB of each item of ``x`` (N, C, H, W) in [0, 1] against ``ref`` (1, C, H, W)."""
    return -10 * torch.log10((x.clamp(0, 1) - ref).square().flatten(1).mean(1).clamp_min(1e-10))


def train_lfq(args: argparse.Namespace, scratch: Path) -> Path:
    """An LFQ tokenizer trained as the shootout trains its rows; the saved model's folder."""
    from tokenizers_vq.eval import quantizer_shootout as shootout  # noqa: PLC0415

    ns = argparse.Namespace(table=shootout.METHODS, scratch=scratch, data=args.data, max_items=0, crop=args.crop,
                            steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    shootout.train("ours-lfq", ns, "cpu")
    return scratch / "ours-lfq" / "checkpoint" / "model"


def first_generation(start: Tensor, bits: int, population: int, rate: float, seed: int) -> Tensor:
    """The start codes (1, *grid) and ``population - 1`` copies with each bit flipped at ``rate``."""
    gen = torch.Generator().manual_seed(seed)
    copies = start.repeat(population - 1, *[1] * (start.dim() - 1))
    flips = (torch.rand(*copies.shape, bits, generator=gen) < rate).long() << torch.arange(bits)
    return torch.cat([start, copies ^ flips.sum(-1)])


def peer_search(tok, photo: Tensor, pop: Tensor, bits: int, generations: int, rate: float, seed: int) -> dict:
    """vector-quantize-pytorch's ``EvoLFQ.evolve`` over the bits of ``pop``'s codes (0/1 genes)."""
    from vector_quantize_pytorch import EvoLFQ  # noqa: PLC0415

    weights = 1 << torch.arange(bits)

    def to_ids(genes: Tensor) -> Tensor:
        return ((genes > 0).long() * weights).sum(-1)

    class Decode(torch.nn.Module):  # the peer's "decoder": its codes (+-1 per bit) -> our ids -> our decoder
        def forward(self, codes: Tensor) -> Tensor:
            return tok.decode(to_ids(codes))

    torch.manual_seed(seed)  # the peer draws from torch's global generator
    evo = EvoLFQ(torch.nn.Identity(), Decode(), dim=bits, codebook_size=2 ** bits, pop_size=len(pop),
                 mutation_rate=rate, generations=generations)
    genes = ((pop[..., None] >> torch.arange(bits)) & 1).float()
    history, last = [], None
    for last in evo.evolve(lambda x, g: psnr(x, photo), pop_bits=genes):
        history.append(float(last.best_fitness))
    returned = float(psnr(tok.decode(to_ids(last.best_gene[None])), photo)[0])
    return {"history": history, "reported": history[-1], "returned": returned}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers_vq.evolve import evolve_tokens  # noqa: PLC0415
    from tokenizers_vq.media import list_media  # noqa: PLC0415
    from tokenizers_vq.modality import get as get_modality  # noqa: PLC0415
    from tokenizers_vq.tokenizer import Tokenizer  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="tvq-code-search-") as scratch:
        model = args.model or train_lfq(args, Path(scratch))
        tok = Tokenizer.from_pretrained(model).eval()
    bits = tok.codebook_size.bit_length() - 1
    image = get_modality("image")
    rows, curves, shown = [], [], None
    for i, path in enumerate(list_media(args.val, "image", args.photos)):
        x = image.load_reference(path)[0][None]  # (1, 3, H, W) in [0, 1], as the tokenizer takes it
        top, left = (x.shape[2] - args.size) // 2, (x.shape[3] - args.size) // 2
        photo = x[:, :, top:top + args.size, left:left + args.size]
        start = tok.encode(photo)
        pop = first_generation(start, bits, args.population, args.mutation_rate, args.seed + i)
        t0 = time.perf_counter()
        ours = evolve_tokens(tok, lambda y, c: psnr(y, photo), pop, population=args.population,
                             generations=args.generations, mutation_rate=args.mutation_rate, seed=args.seed + i)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()  # the same decodings: the peer scores once per generation, ours also the first
        peer = (peer_search(tok, photo, pop, bits, args.generations + 1, args.mutation_rate, args.seed + i)
                if importlib.util.find_spec("vector_quantize_pytorch") else
                {"history": [], "reported": float("nan"), "returned": float("nan")})
        t_peer = time.perf_counter() - t0 if peer["history"] else float("nan")
        start_db = float(psnr(tok.decode(start), photo)[0])
        rows.append({"photo": Path(path).name, "encoder_db": start_db, "ours_db": ours.score,
                     "ours_checked_db": float(psnr(tok.decode(ours.codes), photo)[0]),
                     "peer_reported_db": peer["reported"], "peer_returned_db": peer["returned"],
                     "ours_s": t_ours, "peer_s": t_peer})
        curves.append({"ours": ours.history, "peer": peer["history"]})
        if shown is None:
            shown = (photo, tok.decode(start), tok.decode(ours.codes))
        print(f"{rows[-1]['photo']}: encoder {start_db:.2f} dB, ours {ours.score:.2f}, peer reported "
              f"{peer['reported']:.2f} / returned {peer['returned']:.2f}", file=sys.stderr)
    return {"rows": rows, "curves": curves, "shown": shown, "bits": bits, "model": str(args.model or "trained here")}


def write(res: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = res["rows"]
    peer = ("not installed" if importlib.util.find_spec("vector_quantize_pytorch") is None
            else importlib.metadata.version("vector-quantize-pytorch"))
    meta = {"torch": torch.__version__, "vector_quantize_pytorch": peer,
            "threads": torch.get_num_threads(), "bits": res["bits"], "model": res["model"], "steps": args.steps,
            "population": args.population, "generations": args.generations, "mutation_rate": args.mutation_rate,
            "size": args.size, "command": "python -m tokenizers_vq.eval.benchmarks.code_search " + " ".join(args.argv)}
    (out / "code_search.json").write_text(json.dumps({"meta": meta, "rows": rows, "curves": res["curves"]}, indent=1))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "photo"}
    lines = [f"# Code search through the decoder: ours against vector-quantize-pytorch {meta['vector_quantize_pytorch']}'s EvoLFQ", "",
             f"LFQ image tokenizer ({res['bits']} bits a code; {res['model']}, {args.steps} training steps when trained here), "
             f"{args.size} x {args.size} centre crops of {len(rows)} held-apart photos; population {args.population}, "
             f"{args.generations} generations after the first ({(args.generations + 1) * args.population} decodings each), "
             f"mutation rate {args.mutation_rate} per bit, the same first generation for both; torch {meta['torch']}, "
             f"{meta['threads']} CPU threads. Command: `{meta['command']}`", "",
             "| photo | encoder's codes dB | ours dB | peer reported dB | peer's returned map dB | ours s | peer s |",
             "|---|---|---|---|---|---|---|"]
    for r in [*rows, {"photo": "**mean**", **mean}]:
        lines.append(f"| {r['photo']} | {r['encoder_db']:.2f} | {r['ours_db']:.2f} | {r['peer_reported_db']:.2f} | "
                     f"{r['peer_returned_db']:.2f} | {r['ours_s']:.1f} | {r['peer_s']:.1f} |")
    (out / "code_search.md").write_text("\n".join(lines) + "\n")
    _chart(res, out / "code_search.png")


def _chart(res: dict[str, Any], path: Path) -> None:
    from tokenizers_vq.viz import _pyplot, save_figure  # noqa: PLC0415

    fig, axes = _pyplot().subplots(1, 4, figsize=(16, 4))
    for i, c in enumerate(res["curves"]):
        axes[0].plot(c["ours"], color="C0", label="ours" if i == 0 else None)
        if c["peer"]:
            axes[0].plot(c["peer"], color="C1", ls="--", label="EvoLFQ (reported)" if i == 0 else None)
    axes[0].set(xlabel="generation", ylabel="best PSNR dB", title="best score per generation")
    axes[0].legend()
    names = ["photo", "encoder's codes", "after the search"]
    for ax, img, name in zip(axes[1:], res["shown"], names):
        ax.imshow(img[0].clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(name)
        ax.axis("off")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="training photos (unless --model)")
    p.add_argument("--val", required=True, help="held-apart photos")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, help="an LFQ tokenizer's folder instead of training one")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=64, help="training crop")
    p.add_argument("--size", type=int, default=128, help="centre crop of each held-apart photo")
    p.add_argument("--photos", type=int, default=5)
    p.add_argument("--population", type=int, default=32)
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--mutation-rate", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.model is None and args.data is None:
        p.error("give --data to train an LFQ tokenizer, or --model")
    with torch.no_grad():
        write(run(args), args, args.out)


if __name__ == "__main__":
    main()
