"""What the trainer writes beside its checkpoints for people to look at:
reconstructions (PNG grid; WAV and spectrogram pictures for audio; frame grid and
MP4 for video) and a codebook-usage plot, from a few fixed files."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenizers_vq.quantizers._functional import code_histogram
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import decode_record, encode_file
from tokenizers_vq.viz import image_grid, spectrogram_plot, usage_plot


@torch.no_grad()
def write(tok: Tokenizer, files: list[Path], out_dir: Path, n_items: int = 4, max_seconds: float = 5.0) -> None:
    """Encode/decode the first ``n_items`` files and write pictures (and sounds)."""
    from tokenizers_vq.media import load_image  # noqa: PLC0415
    from tokenizers_vq.media import load_audio, load_video, save_audio, save_video  # noqa: PLC0415
    from tokenizers_vq.spectral import spectrogram_db  # noqa: PLC0415

    if tok.is_dynamic:
        raise ValueError("training samples are written for fixed-grid tokenizers only; this one has dynamic-length "
                         "codes: set sample_every=0 and check it with Tokenizer.encode/decode")
    was_training = tok.training
    tok.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, all_codes = [], []
    for i, f in enumerate(files[:n_items]):
        rec = encode_file(tok, f, max_frames=tok.config.clip_frames)
        all_codes.append(rec.codes.reshape(-1, tok.quantizer.num_codebooks))
        media = decode_record(tok, rec)
        if tok.modality == "image":
            rows.append([load_image(f), media])
        elif tok.modality == "audio":
            n = int(max_seconds * tok.sample_rate)
            orig = load_audio(f, tok.sample_rate)[0].mean(0)[:n]
            save_audio(orig, out_dir / f"{i}_original.wav", tok.sample_rate)
            save_audio(media[:, :n], out_dir / f"{i}_reconstruction.wav", tok.sample_rate)
            specs = {"original": spectrogram_db(orig, tok.sample_rate), "reconstruction": spectrogram_db(media[0, :n], tok.sample_rate)}
            spectrogram_plot(specs, out_dir / f"{i}_spectrogram.png", tok.sample_rate, 256)
        else:
            frames = load_video(f, media.shape[0])[0]
            picks = sorted({0, media.shape[0] // 2, media.shape[0] - 1})
            rows += [[frames[t] for t in picks], [media[t] for t in picks]]
            if i == 0:
                save_video(media, out_dir / f"{i}_reconstruction.mp4", rec.info.get("fps", 25.0))
    if rows:
        image_grid(rows, out_dir / "reconstructions.png")
    codes = torch.cat(all_codes)
    counts = {f"codebook {j}": code_histogram(codes[:, j], tok.quantizer.codebook_size) for j in range(min(codes.shape[1], 4))}
    usage_plot(counts, out_dir / "codebook_usage.png", title=f"codebook usage on {len(all_codes)} items")
    tok.train(was_training)
