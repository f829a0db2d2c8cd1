"""Copy the part of ``../shared/data`` that a GPU run needs into ``.devdata/`` (git-ignored),
small enough to travel with the working tree (the device tool carries 64 MiB in all).

    python eval/gpu/prepare_data.py images-train audio video      # training call
    python eval/gpu/prepare_data.py images-train images-val       # benchmark call

Videos become folders of JPEG frames (quality 95, longer side at most 256 pixels, at most
96 frames), which the trainer reads without PyAV. LibriSpeech keeps the speakers the
audio config trains on (the sorted first 90%), up to ``--audio-mb``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
DEST = REPO / ".devdata"


def copy_files(files: list[Path], dest: Path, budget: float = float("inf")) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in files:
        if total + f.stat().st_size > budget:
            break
        shutil.copy2(f, dest / f.name)
        total += f.stat().st_size
    return total


def video_frames(src: Path, dest: Path, max_side: int = 256, max_frames: int = 96) -> int:
    from PIL import Image  # noqa: PLC0415

    from tokenizers_vq.media import load_video  # noqa: PLC0415

    frames, fps = load_video(src, max_frames)
    dest.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    size = (round(w * scale) // 8 * 8, round(h * scale) // 8 * 8)
    for i, f in enumerate(frames):
        img = Image.fromarray((f * 255).round().byte().permute(1, 2, 0).numpy())
        if scale < 1:
            img = img.resize(size, Image.Resampling.LANCZOS)
        img.save(dest / f"{i:04d}.jpg", quality=95)
    (dest / "fps.txt").write_text(f"{fps}")
    return sum(p.stat().st_size for p in dest.iterdir())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="+", choices=["images-train", "images-val", "audio", "video"])
    p.add_argument("--audio-mb", type=float, default=18.0)
    args = p.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED}")
    sizes = {}
    for what in args.what:
        if what.startswith("images"):
            split = what.split("-")[1]
            src = sorted((SHARED / "images" / "bsds500" / split).glob("*.jpg"))
            sizes[what] = copy_files(src, DEST / "images" / split)
        elif what == "audio":
            from tokenizers_vq.train.config import load_config  # noqa: PLC0415
            from tokenizers_vq.train.data import list_media, split_files  # noqa: PLC0415

            held_out = load_config(REPO / "train" / "configs" / "audio.yaml").data.val_fraction
            train, _ = split_files(list_media(SHARED / "audio" / "librispeech_train-clean-100", "audio"), None, held_out)
            sizes[what] = copy_files(train, DEST / "audio" / "librispeech", args.audio_mb * 2**20)
        else:
            sizes[what] = sum(video_frames(f, DEST / "video" / f.stem) for f in sorted((SHARED / "video").iterdir()))
    for k, v in sizes.items():
        print(f"{k}: {v / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
