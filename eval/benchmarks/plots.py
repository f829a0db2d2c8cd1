"""Pictures of the benchmarks: the nearest-code search (each case's time per method beside
the floor) and the tokenizer throughput (encode + decode rate against batch size).

    python -m tokenizers_vq.eval.benchmarks.plots eval/results/kernels/nearest_h200.json
    python -m tokenizers_vq.eval.benchmarks.plots eval/results/throughput/h200/throughput.json

writes the picture next to the JSON, under its name (the benchmarks write it with their tables).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers_vq.viz import _pyplot, save_figure

SERIES = {  # method key in the JSON: legend label
    "ours_bf16": "ours bf16 (eager call)",
    "ours_fp32": "ours fp32 (tf32)",
    "flash_kmeans_fp16": "flash-kmeans fp16",
    "faiss_fp32": "FAISS GPU flat fp32",
    "mm_bf16": "x @ C^T bf16",
    "vqp": "vector-quantize-pytorch",
}


def search_plot(result: dict, path: str | Path, floor_ms) -> Path:
    """Grouped bars (log scale) of each case's median ms per method of :data:`SERIES` that
    ran, cases in order of their floor, the floor as a black line over each group.
    ``floor_ms(n, k, d, rates)`` gives ``(floor, epilogue bound)``."""
    plt = _pyplot()
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
    return save_figure(fig, path)


def _setting(row: dict) -> str:
    parts = [row["model"].replace(" peer:", ", peer:"), row["precision"]]
    parts += ["compiled"] * bool(row.get("compile")) + ["channels-last"] * bool(row.get("channels_last"))
    return ", ".join(parts)


def throughput_plot(result: dict, path: str | Path) -> Path:
    """One panel per unit (images, seconds of audio, frames): encode + decode per second
    (log scale) against the batch size, a line per model and setting; failed rows left out."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if "error" not in r]
    units = list(dict.fromkeys(r["unit"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(units)), figsize=(5.5 * max(1, len(units)), 4.5), dpi=100, squeeze=False)
    for ax, unit in zip(axes[0], units):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["unit"] == unit:
                lines.setdefault(_setting(r), []).append((r["batch"], r["both_per_s"]))
        for label, points in lines.items():
            points.sort()
            ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        batches = sorted({b for points in lines.values() for b, _ in points})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(f"{unit} per second, encode + decode")
        ax.legend(fontsize=6)
    fig.suptitle(f"tokenizer throughput ({result['meta'].get('device_name', '')})")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    from tokenizers_vq.eval.benchmarks.nearest import floor_ms  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path, help="a nearest.json or throughput.json a benchmark wrote")
    p.add_argument("--out", type=Path, default=None, help="default: the JSON's name with .png, beside it")
    args = p.parse_args(argv)
    out = args.out or args.json.with_name(args.json.stem + ".png")
    result = json.loads(args.json.read_text())
    print(search_plot(result, out, floor_ms) if "cases" in result else throughput_plot(result, out))


if __name__ == "__main__":
    main()
