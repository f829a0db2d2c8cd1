"""Media read as a viewer shows it: colour profiles and colour keys on images; a container's
pixel aspect, its frame rate despite a few odd timestamps, a held last frame, a cut-short AVI
and a codec without a decoder on video."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from testdata import shared_path

from tokenizers_vq.media import image_header, load_image_u8, load_video, save_video
from tokenizers_vq.video_io import read_video_file

ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary (apt-get install ffmpeg)")


def _wide_gamut_profile() -> bytes:
    """A matrix/TRC ICC profile with Display P3's primaries (D50-adapted) and gamma 2.2."""
    def xyz(x, y, z):
        return b"XYZ " + bytes(4) + b"".join(struct.pack(">i", round(v * 65536)) for v in (x, y, z))

    name = b"wide gamut test\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(78)),
            (b"wtpt", xyz(0.9642, 1.0, 0.82491)), (b"rXYZ", xyz(0.515102, 0.241182, -0.00105)),
            (b"gXYZ", xyz(0.291965, 0.692236, 0.041885)), (b"bXYZ", xyz(0.157153, 0.066582, 0.784378)),
            *((sig, b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256))) for sig in (b"rTRC", b"gTRC", b"bTRC"))]
    offset, table, data = 132 + 12 * len(tags), b"", b""
    for sig, body in tags:
        data += bytes(-(offset + len(data)) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    d50 = b"".join(struct.pack(">i", round(v * 65536)) for v in (0.9642, 1.0, 0.8249))
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + d50 + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def test_an_embedded_colour_profile_is_converted_to_srgb(tmp_path):
    srgb = Image.new("RGB", (32, 16))
    for i, c in enumerate([(255, 0, 0), (40, 160, 90)]):
        srgb.paste(c, (16 * i, 0, 16 * i + 16, 16))
    icc = _wide_gamut_profile()
    stored = ImageCms.profileToProfile(srgb, ImageCms.createProfile("sRGB"), ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                       outputMode="RGB")
    stored.save(tmp_path / "wide.png", icc_profile=icc)
    got = load_image_u8(tmp_path / "wide.png")
    stored_values = np.asarray(stored)[8, [8, 24]]
    assert np.abs(stored_values.astype(int) - [[255, 0, 0], [40, 160, 90]]).max() > 20  # other numbers on disk
    assert np.abs(got[:, 8, [8, 24]].T.numpy().astype(int) - [[255, 0, 0], [40, 160, 90]]).max() <= 3
    stored.save(tmp_path / "plain.png", icc_profile=None)  # no profile: the numbers as stored
    assert (load_image_u8(tmp_path / "plain.png")[:, 8, [8, 24]].T.numpy() == stored_values).all()
    # a palette image's colours are in its profile's space too
    stored.quantize(4).save(tmp_path / "palette.png", icc_profile=icc)
    with Image.open(tmp_path / "palette.png") as im:
        assert im.mode == "P" and im.info.get("icc_profile") == icc
    got = load_image_u8(tmp_path / "palette.png")
    assert np.abs(got[:, 8, [8, 24]].T.numpy().astype(int) - [[255, 0, 0], [40, 160, 90]]).max() <= 3


@pytest.mark.parametrize("mode,key", [("RGB", (10, 20, 30)), ("L", 0)])
def test_a_colour_key_is_transparent_and_composited_on_white(tmp_path, mode, key):
    im = Image.new(mode, (8, 4), key)
    im.paste((200, 100, 50) if mode == "RGB" else 120, (4, 0, 8, 4))
    im.save(tmp_path / "keyed.png", transparency=key)
    got = load_image_u8(tmp_path / "keyed.png")
    assert (got[:, :, :4] == 255).all()  # the keyed half: white, not the key colour
    assert got[:, 0, 6].tolist() == ([200, 100, 50] if mode == "RGB" else [120] * 3)
    assert image_header(tmp_path / "keyed.png")[2] == (4 if mode == "RGB" else 2)


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def _frames(tmp_path, n: int) -> list:
    names = []
    for i in range(n):
        name = tmp_path / f"{i:02d}.png"
        Image.fromarray(np.full((48, 64, 3), (i * 20) % 256, np.uint8)).save(name)
        names.append(name)
    return names


@ffmpeg
def test_a_pixel_aspect_stated_by_the_container_is_kept(tmp_path):
    pytest.importorskip("av", reason="PyAV reads video")
    _frames(tmp_path, 4)
    _ffmpeg("-framerate", "25", "-i", str(tmp_path / "%02d.png"), "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(tmp_path / "square.mp4"))
    _ffmpeg("-i", str(tmp_path / "square.mp4"), "-c", "copy", "-aspect", "16:9", str(tmp_path / "wide.mkv"))
    assert read_video_file(tmp_path / "square.mp4", None, None)[3] is None
    assert read_video_file(tmp_path / "wide.mkv", None, None)[3] == (4, 3)  # 64x48 shown as 16:9


def _timed_clip(path, pts: list[int], last_duration: int = 1, codec: str = "libx264") -> None:
    """Frames at the given timestamps (in 1/30 s; no B-frames), the last shown for
    ``last_duration`` of those ticks."""
    av = pytest.importorskip("av", reason="PyAV writes video")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 48, "yuv420p", {"bf": "0"}
        packets = []
        for i, t in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10 % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 30)
            packets += stream.encode(frame)
        for packet in packets + list(stream.encode()):
            packet.duration, packet.time_base = (last_duration if packet.pts == pts[-1] else 1), Fraction(1, 30)
            out.mux(packet)


def test_a_held_last_frame_is_not_taken_for_a_cut_short_file(tmp_path):
    """Nine frames at 30 fps, the last shown for 9 s (a screen recording ending on a still)."""
    _timed_clip(tmp_path / "held.mp4", list(range(9)), last_duration=270)
    frames, fps = load_video(tmp_path / "held.mp4")
    assert frames.shape[0] == 9 and fps == pytest.approx(30, rel=0.01)


def test_a_few_odd_timestamps_leave_the_frame_rate_as_stated(tmp_path):
    """17 frames at 30 fps, the last three ticks late (as a cut without re-encoding leaves it);
    and frames at a varying rate, read at their mean rate."""
    _timed_clip(tmp_path / "cut.mp4", [*range(16), 18])
    assert load_video(tmp_path / "cut.mp4")[1] == pytest.approx(30, rel=0.01)
    _timed_clip(tmp_path / "varying.mp4", [0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24])
    assert load_video(tmp_path / "varying.mp4")[1] == pytest.approx(11 / (24 / 30), rel=0.01)


def test_an_avi_cut_short_is_refused(tmp_path):
    """An AVI that lost its end (and its index): FFmpeg guesses its duration from the file's size."""
    pytest.importorskip("av", reason="PyAV reads video")
    whole = shared_path("video", "mmaction2_test.avi")
    assert load_video(whole)[0].shape[0] == 164
    (tmp_path / "cut.avi").write_bytes(whole.read_bytes()[:200_000])
    with pytest.raises(ValueError, match=r"cut short \(its header counts 164 frames, \d+ could be decoded\)"):
        load_video(tmp_path / "cut.avi")
    held = [t for t in range(80) if t % 4 != 3]  # every third frame held twice as long: the header counts 80
    _timed_clip(tmp_path / "varying.avi", held, codec="mpeg4")
    assert load_video(tmp_path / "varying.avi")[0].shape[0] == 60


def test_a_codec_without_a_decoder_is_named_with_the_re_encoding(tmp_path):
    pytest.importorskip("av", reason="PyAV writes video")
    save_video(torch.rand(3, 3, 48, 64), tmp_path / "clip.mp4", 25)
    (tmp_path / "odd.mp4").write_bytes((tmp_path / "clip.mp4").read_bytes().replace(b"avc1", b"zzzz"))
    with pytest.raises(ValueError, match=r"no decoder for its video codec; re-encode it: ffmpeg -i IN -c:v libx264"):
        load_video(tmp_path / "odd.mp4")


def test_a_data_folder_is_listed_through_links_once_and_an_unreadable_folder_is_named(tmp_path, monkeypatch):
    from pathlib import Path  # noqa: PLC0415

    from tokenizers_vq.media import left_out, list_media  # noqa: PLC0415

    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:3]
    (tmp_path / "real").mkdir()
    for p in photos:
        shutil.copy(p, tmp_path / "real")
    data = tmp_path / "data"
    data.mkdir()
    (data / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (data / "again").symlink_to(tmp_path / "real", target_is_directory=True)  # the same folder: listed once
    (tmp_path / "real" / "up").symlink_to(data, target_is_directory=True)  # a loop
    (data / "talk.m4a").write_bytes(b"\0" * 16)
    (data / "clip.m4v").write_bytes(b"\0" * 16)
    assert sorted(p.name for p in list_media(data, "image")) == sorted(p.name for p in photos)
    assert [p.name for p in list_media(data, "video")] == ["clip.m4v"]
    notes = left_out(data, "image")
    assert any("holds 1 file of a type this library does not read (.m4a), left out" in n for n in notes)
    real_iterdir = Path.iterdir

    def unreadable(self):
        if self.name in ("linked", "again"):
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", unreadable)
    (data / "top.jpg").write_bytes(photos[0].read_bytes())
    with pytest.warns(UserWarning, match=r"cannot read the folder .*(linked|again) \(Permission denied\): its files are "
                                         r"left out"):
        assert [p.name for p in list_media(data, "image")] == ["top.jpg"]
    with pytest.raises(ValueError, match=r"cannot read the folder .*linked \(Permission denied\)"):
        list_media(data / "linked", "image")


def test_resampling_takes_float_audio_of_any_length_on_its_own_device():
    """Integer PCM is refused naming the conversion (the filter's taps, all under 1, would round
    to 0: silence); no samples give no samples; the filter is built on the audio's device (a
    meta tensor here, for both paths)."""
    from tokenizers_vq.resample import resample  # noqa: PLC0415

    pcm = torch.tensor([[0, 10000, 20000, 10000, 0, -10000, -20000, -10000] * 20], dtype=torch.int16)
    with pytest.raises(ValueError, match=r"resample takes float audio, got torch.int16: .*wav.float\(\) / 32768"):
        resample(pcm, 16000, 24000)
    for rates in ((16000, 24000), (11127, 16000)):  # the strided-filter and the per-sample paths
        assert resample(torch.zeros(1, 0), *rates).shape == (1, 0)
        assert resample(torch.zeros(0, 100), *rates).shape == (0, -(-100 * rates[1] // rates[0]))
        assert resample(torch.empty(2, 100, device="meta"), *rates).shape == (2, -(-100 * rates[1] // rates[0]))
        wave = torch.sin(torch.arange(800) / 5.0)[None]
        assert resample(wave, *rates).abs().max() > 0.9  # a float signal is carried
