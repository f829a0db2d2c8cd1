"""Evaluate a tokenizer on a folder of media: per-item metrics, aggregates, speed.

Every reported number comes from the functions in ``eval.metrics`` (and, when their
networks are given, ``eval.lpips`` / ``eval.inception``), over the files listed, with
the model's own encode/decode (the same path as ``tvq encode`` / ``tvq decode``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenizers_vq.eval.inception import FIDInception, inception_features
from tokenizers_vq.lpips import LPIPSNet, lpips_distance
from tokenizers_vq.quantizers._functional import code_histogram
from tokenizers_vq.eval.metrics import (audio_metrics, colour_shift, feature_frechet_distance, ms_ssim, psnr, ssim,
                                        token_stats)
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import decode_record, encode_file


def _image_metrics(rec: torch.Tensor, ref: torch.Tensor, sample_rate: int | None) -> dict[str, Any]:
    return {"psnr_db": psnr(rec, ref), "ssim": ssim(rec, ref), "ms_ssim": ms_ssim(rec, ref),
            "colour_shift": colour_shift(rec, ref)}


def _audio_metrics(rec: torch.Tensor, ref: torch.Tensor, sample_rate: int | None) -> dict[str, Any]:
    return audio_metrics(rec[0], ref[0], sample_rate)


def _video_metrics(rec: torch.Tensor, ref: torch.Tensor, sample_rate: int | None) -> dict[str, Any]:
    per_frame = [psnr(r, f) for r, f in zip(rec, ref)]
    ssims = [ssim(r, f) for r, f in zip(rec, ref)]
    # flicker: how much the frame-to-frame changes differ between input and output (none in one frame)
    flicker = torch.mean(((rec[1:] - rec[:-1]) - (ref[1:] - ref[:-1])).abs()).item() if len(ref) > 1 else None
    out = {"psnr_db": sum(per_frame) / len(per_frame), "ssim": sum(ssims) / len(ssims), "flicker": flicker,
           "colour_shift": colour_shift(rec, ref)}
    return out if flicker is not None else {**out, "flicker_note": "not computed: one frame has no frame-to-frame change"}


ITEM_METRICS = {"image": _image_metrics, "audio": _audio_metrics, "video": _video_metrics}
"""Per-item metrics by modality name (:mod:`tokenizers_vq.modality`), on media-space tensors."""


def item_metrics(tok: Tokenizer, ref: torch.Tensor, rec: torch.Tensor, lpips: LPIPSNet | None = None) -> dict[str, Any]:
    """Metrics of one item (media space, as :meth:`Modality.load_media` and ``to_media``
    give them); ``lpips`` adds LPIPS to pictures (per frame and averaged for video)."""
    out = ITEM_METRICS[tok.modality](rec, ref, tok.sample_rate)
    if lpips is not None and tok.media.has_pixels:
        if min(ref.shape[-2:]) >= lpips.min_side():
            out["lpips"] = lpips_distance(lpips, rec, ref)
        else:  # too small for the trunk's pooling: the other metrics still count
            out.update(lpips=None, lpips_note=f"LPIPS not computed: {ref.shape[-1]}x{ref.shape[-2]} pixels, its "
                                              f"{lpips.net} network takes at least {lpips.min_side()} a side")
    return out


def item_names(files: list[Path]) -> list[str]:
    """How a report names its items: file names, or where two are alike, paths below the folder
    that holds them all."""
    if len({f.name for f in files}) == len(files):
        return [f.name for f in files]
    full = [Path(os.path.abspath(f)) for f in files]  # (links kept as named)
    root = Path(os.path.commonpath([f.parent for f in full]))
    return [f.relative_to(root).as_posix() for f in full]


def peak_memory_mib() -> float:
    """Peak memory of this process on its device: CUDA allocator peak on a GPU,
    the process's peak resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(tok: Tokenizer, files: list[Path], max_frames: int | None = 33, lpips: LPIPSNet | None = None,
             inception: FIDInception | None = None) -> dict[str, Any]:
    """Encode and decode every file; returns ``{"items": [...], "summary": {...}, "failed": [...],
    "code_histogram": counts}`` (``failed``: the files a reader refused or whose metrics failed,
    each with its error, counted in no summary; all of them failing raises ``ValueError``; ``counts``: ``(K,)`` uses of each code of the first
    codebook over every item's tokens).

    Fixed-grid tokenizers only (a dynamic-length one raises ``ValueError``).

    ``lpips`` adds per-item ``lpips`` (and its mean); ``inception`` (images only) adds
    ``rfid``, the FID between the originals and their reconstructions, and
    ``rfid_images``, the number of images it is over (FID is biased upwards for few
    images; it needs at least 2).
    """
    if tok.is_dynamic:
        raise ValueError("tvq eval measures fixed-grid tokenizers only; this one has dynamic-length codes "
                         "(encode/decode them with Tokenizer.encode/decode)")
    tok.eval()
    items, all_codes, ref_feats, rec_feats = [], [], [], []
    seconds = units = pixels = 0.0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    failed = []
    for f in tqdm(files, desc="evaluate"):
        t0 = time.perf_counter()
        try:  # a file the readers refuse is named in the report; the others are still measured
            rec = encode_file(tok, f, max_frames=max_frames)
            out = decode_record(tok, rec)
            ref = tok.media.load_media(f, tok.sample_rate, max_frames)
        except ValueError as e:
            failed.append({"file": str(f), "error": str(e)})
            continue
        took = time.perf_counter() - t0
        try:  # one item's metrics failing is that item's error, not the run's: it counts nowhere
            m = item_metrics(tok, ref, out, lpips)
        except (ValueError, RuntimeError) as e:
            failed.append({"file": str(f), "error": f"{f}: its metrics failed: {e}"})
            continue
        seconds += took
        all_codes.append(rec.codes.reshape(-1, tok.quantizer.num_codebooks))
        if inception is not None and tok.media.fid:
            ref_feats.append(inception_features(inception, ref))
            rec_feats.append(inception_features(inception, out))
        units += tok.media.units(ref, tok.sample_rate)
        pixels += tok.media.pixels(ref)
        grid = rec.codes.shape[: rec.codes.ndim - len(tok.quantizer.code_shape)]
        items.append({"file": f, "tokens": tok.quantizer.num_tokens(grid), **m})
    if not items:
        raise ValueError(f"no file could be evaluated; the first: {failed[0]['error']}" if failed else "no files")
    for it, name in zip(items, item_names([it["file"] for it in items])):
        it["file"] = name
    summary: dict[str, Any] = {}
    unscored: dict[str, int] = {}
    for key in dict.fromkeys(k for it in items for k in it if k != "file"):
        vals = [it[key] for it in items if isinstance(it.get(key), (int, float))]
        if vals:
            summary[key] = sum(vals) / len(vals)
            if len(vals) < len(items):  # some items have no value for it (their notes say why)
                unscored[key] = len(items) - len(vals)
    if len(ref_feats) >= 2:
        summary["rfid"] = feature_frechet_distance(torch.cat(ref_feats), torch.cat(rec_feats))
        summary["rfid_images"] = len(ref_feats)
    summary.update(token_stats(torch.cat(all_codes), tok.quantizer.codebook_size))
    bits = math.log2(tok.quantizer.codebook_size) * sum(it["tokens"] for it in items)
    summary["bits_per_token"] = math.log2(tok.quantizer.codebook_size)
    if pixels:
        summary["bits_per_pixel"] = bits / pixels
    else:  # audio
        summary["kbps"] = bits / units / 1000
    summary[tok.media.token_rate] = sum(it["tokens"] for it in items) / units
    summary[f"{tok.media.unit}_per_s"] = units / max(seconds, 1e-9)
    summary["device"] = str(next(tok.parameters()).device)
    summary["peak_memory_mib"] = peak_memory_mib()
    summary["items"] = len(items)
    if unscored:
        summary["unscored"] = unscored
    first = torch.cat(all_codes)[:, 0].long()  # the first codebook's (a residual stack's first level)
    return {"items": items, "summary": summary, "failed": failed,
            "code_histogram": code_histogram(first, tok.quantizer.codebook_size)}
