"""What the trainer writes beside its checkpoints for people to look at:
reconstructions (PNG grid; WAV and spectrogram pictures for audio; frame grid and
MP4 for video) and a codebook-usage plot, from a few fixed files."""

from __future__ import annotations

import re

from pathlib import Path

import torch
from torch import Tensor

from tokenizers_vq.quantizers._functional import code_histogram
from tokenizers_vq.quantizers.base import evaluating
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import decode_record, encode_file
from tokenizers_vq.viz import image_grid, spectrogram_plot, usage_plot


def _image_rows(tok: Tokenizer, f: Path, media: Tensor, i: int, info: dict, out_dir: Path,
                max_seconds: float) -> list[list[Tensor]]:
    """One grid row: the photo and its reconstruction."""
    return [[tok.media.load_media(f), media]]


def _audio_rows(tok: Tokenizer, f: Path, media: Tensor, i: int, info: dict, out_dir: Path,
                max_seconds: float) -> list[list[Tensor]]:
    """No grid rows: the first ``max_seconds`` as WAV files and a spectrogram picture."""
    from tokenizers_vq.media import save_audio  # noqa: PLC0415
    from tokenizers_vq.spectral import spectrogram_db  # noqa: PLC0415

    n, sr = int(max_seconds * tok.sample_rate), tok.sample_rate
    orig = tok.media.load_media(f, sr)[0, :n]
    save_audio(orig, out_dir / f"{i}_original.wav", sr)
    save_audio(media[:, :n], out_dir / f"{i}_reconstruction.wav", sr)
    specs = {"original": spectrogram_db(orig, sr), "reconstruction": spectrogram_db(media[0, :n], sr)}
    spectrogram_plot(specs, out_dir / f"{i}_spectrogram.png", sr, 256)
    return []


def _video_rows(tok: Tokenizer, f: Path, media: Tensor, i: int, info: dict, out_dir: Path,
                max_seconds: float) -> list[list[Tensor]]:
    """Two grid rows (first, middle and last frame, original over reconstruction); the
    first clip's reconstruction as MP4."""
    from tokenizers_vq.media import save_video  # noqa: PLC0415

    frames = tok.media.load_media(f, max_frames=media.shape[0])
    picks = sorted({0, media.shape[0] // 2, media.shape[0] - 1})
    if i == 0:
        save_video(media, out_dir / f"{i}_reconstruction.mp4", info.get("fps", 25.0), info.get("pixel_aspect"))
    return [[frames[t] for t in picks], [media[t] for t in picks]]


_ITEM_SAMPLES = {"image": _image_rows, "audio": _audio_rows, "video": _video_rows}


@torch.no_grad()
def write(tok: Tokenizer, files: list[Path], out_dir: Path, n_items: int = 4, max_seconds: float = 5.0,
          max_frames: int | None = None) -> None:
    """Encode/decode the first ``n_items`` files and write pictures (and sounds); videos over their
    first ``max_frames`` frames, at most one clip of the model (``None``: one clip)."""
    if tok.is_dynamic:
        raise ValueError("training samples are written for fixed-grid tokenizers only; this one has dynamic-length "
                         "codes: set sample_every=0 and check it with Tokenizer.encode/decode")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():  # an earlier run's samples (more items, another modality) would pass for this run's
        if re.fullmatch(r"(\d+_(original|reconstruction|spectrogram)\.(wav|mp4|png)|reconstructions\.png)", old.name):
            old.unlink()
    rows, all_codes = [], []
    with evaluating(tok):  # each part's own mode back after, also when a file fails
        for i, f in enumerate(files[:n_items]):
            rec = encode_file(tok, f, max_frames=min(max_frames or tok.config.clip_frames, tok.config.clip_frames))
            all_codes.append(rec.codes.reshape(-1, tok.quantizer.num_codebooks))
            rows += _ITEM_SAMPLES[tok.modality](tok, f, decode_record(tok, rec), i, rec.info, out_dir, max_seconds)
    if rows:
        image_grid(rows, out_dir / "reconstructions.png")
    codes = torch.cat(all_codes)
    counts = {f"codebook {j}": code_histogram(codes[:, j], tok.quantizer.codebook_size) for j in range(min(codes.shape[1], 4))}
    usage_plot(counts, out_dir / "codebook_usage.png", title=f"codebook usage on {len(all_codes)} items")
