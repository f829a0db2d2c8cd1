"""Pictures of results: image grids and codebook-usage plots (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from tokenizers_vq.io import atomic_write

from tokenizers_vq.media import save_image


def _row(images: Sequence[Tensor], pad: int) -> Tensor:
    h = max(im.shape[1] for im in images)
    w = sum(im.shape[2] for im in images) + pad * (len(images) - 1)
    canvas = torch.ones(3, h, w)
    x = 0
    for im in images:
        canvas[:, : im.shape[1], x : x + im.shape[2]] = im.detach().float().cpu()
        x += im.shape[2] + pad
    return canvas


def image_grid(rows: Sequence[Sequence[Tensor]], path: str | os.PathLike, pad: int = 4) -> Path:
    """Save rows of ``(3, H, W)`` images in ``[0, 1]`` as one picture (white gaps)."""
    built = [_row(r, pad) for r in rows]
    w = max(r.shape[2] for r in built)
    h = sum(r.shape[1] for r in built) + pad * (len(built) - 1)
    canvas = torch.ones(3, h, w)
    y = 0
    for r in built:
        canvas[:, y : y + r.shape[1], : r.shape[2]] = r
        y += r.shape[1] + pad
    return save_image(canvas, path)


def image_row(images: Sequence[Tensor], path: str | os.PathLike, pad: int = 4) -> Path:
    """Save ``(3, H, W)`` images in ``[0, 1]`` side by side (white gaps) as one picture."""
    return image_grid([images], path, pad)


def spectrogram_plot(specs: dict[str, Tensor], path: str | os.PathLike, sample_rate: int, hop: int) -> Path:
    """Log-mel spectrograms ``(n_mels, frames)`` in dB, one panel each, stacked."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(specs), 1, figsize=(9, 2.2 * len(specs)), dpi=100, squeeze=False)
    for ax, (name, s) in zip(axes[:, 0], specs.items()):
        s = s.detach().float().cpu()
        ax.imshow(s.numpy(), origin="lower", aspect="auto", vmin=float(s.max()) - 80, vmax=float(s.max()),
                  extent=(0, s.shape[1] * hop / sample_rate, 0, s.shape[0]), cmap="magma")
        ax.set_title(name)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel("seconds")
    return save_figure(fig, path)


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it atomically (format by the suffix) and close it."""
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp))
    _pyplot().close(fig)
    return out


def usage_plot(counts: dict[str, Tensor], path: str | os.PathLike, title: str = "codebook usage") -> Path:
    """Sorted code frequencies (log scale) per quantizer, one line each."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, c in counts.items():
        c = c.detach().float().cpu()
        freq = (c / c.sum().clamp_min(1)).sort(descending=True).values
        used = int((c > 0).sum())
        ax.plot(torch.arange(1, len(freq) + 1).numpy(), freq.numpy(), label=f"{name} ({used}/{len(c)} used)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("code rank")
    ax.set_ylabel("frequency")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
