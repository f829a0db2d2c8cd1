"""Pictures of the nearest-code benchmark: each case's time per method beside the floor.

    python -m tokenizers_vq.eval.benchmarks.plots eval/results/kernels/nearest_h200.json

writes ``nearest.png`` next to the JSON (the benchmark writes it with every table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers_vq.io import atomic_write

SERIES = {  # method key in the JSON: legend label
    "ours_bf16": "ours bf16 (eager call)",
    "ours_fp32": "ours fp32 (tf32)",
    "flash_kmeans_fp16": "flash-kmeans fp16",
    "faiss_fp32": "FAISS GPU flat fp32",
    "mm_bf16": "x @ C^T bf16 (no argmin)",
    "vqp": "vector-quantize-pytorch",
}


def search_plot(result: dict, path: str | Path, floor_ms) -> Path:
    """Grouped bars (log scale) of each case's median ms per method of :data:`SERIES` that
    ran, cases in order of their floor, the floor as a black line over each group.
    ``floor_ms(n, k, d, rates)`` gives ``(floor, epilogue bound)``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cases = sorted(result["cases"], key=lambda c: floor_ms(c["n"], c["k"], c["d"], result["meta"]["rates"])[0])
    shown = [m for m in SERIES if any(c["methods"].get(m, {}).get("status") == "ok" for c in cases)]
    width = 0.8 / max(1, len(shown))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(cases)), 4.5), dpi=100)
    for j, m in enumerate(shown):
        xs, ys = [], []
        for i, c in enumerate(cases):
            r = c["methods"].get(m, {})
            if r.get("status") == "ok" and r.get("ms") == r.get("ms"):  # not NaN
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(r["ms"])
        ax.bar(xs, ys, width, label=SERIES[m])
    for i, c in enumerate(cases):
        fl = floor_ms(c["n"], c["k"], c["d"], result["meta"]["rates"])[0]
        ax.plot([i - 0.45, i + 0.45], [fl, fl], color="black", linewidth=1.5, label="floor" if i == 0 else None)
    ax.set_xticks(range(len(cases)), [f"{c['n']}x{c['k']}x{c['d']}" for c in cases], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"nearest-code search, N x K x D ({result['meta'].get('date', '')})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    from tokenizers_vq.eval.benchmarks.nearest import floor_ms  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path, help="a nearest.json the benchmark wrote")
    p.add_argument("--out", type=Path, default=None, help="default: nearest.png beside the JSON")
    args = p.parse_args(argv)
    out = args.out or args.json.with_name(args.json.stem + ".png")
    print(search_plot(json.loads(args.json.read_text()), out, floor_ms))


if __name__ == "__main__":
    main()
