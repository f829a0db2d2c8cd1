"""The media readers and ``tvq encode`` on broken, mislabelled and hostile files.

Files are real media cut at random offsets, random bytes, empty files, real files under
another modality's suffix, headers that claim huge sizes, directories with media
suffixes, folders of frames with a bad ``fps.txt``, and missing paths. The property:
``modality_of``, ``load_image``, ``load_audio``, ``load_video``, ``load_input`` and
``tvq encode`` (with a tiny model of the file's modality) return a valid result or
raise a ValueError (``tvq``: exit code 2 and ``tvq: error:``) whose message names the
file; never another exception, a hang or an unbounded allocation. The readers run in
a worker process (tests/fuzz/media_worker.py) with a time limit per call and a cap on
its address space.
"""

from __future__ import annotations

import math
import os
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenizers_vq.cli import main
from tokenizers_vq.media import save_image
from tokenizers_vq.resample import _resample_by_neighbours, resample

from fuzz_media_harness import (  # the fixtures too
    SOURCES,
    SUFFIXES,
    models,  # noqa: F401
    read_everything,
    scratch,  # noqa: F401
    sources,  # noqa: F401
    worker,  # noqa: F401
)

@dataclass(frozen=True)
class Cut:
    """The first ``keep`` bytes (an int) or fraction (a float) of a real ``source``
    file, saved under ``suffix``."""

    source: str
    keep: int | float
    suffix: str

    def make(self, folder: Path, sources: dict[str, bytes]) -> Path:
        data = sources[self.source]
        n = self.keep if isinstance(self.keep, int) else int(len(data) * self.keep)
        folder.mkdir(parents=True)
        path = folder / f"cut{self.suffix}"
        path.write_bytes(data[:n])
        return path


cuts = st.builds(
    Cut,
    source=st.sampled_from(list(SOURCES)),
    keep=st.one_of(st.integers(0, 128), st.floats(0.0, 1.0)),
    suffix=st.sampled_from(["own"] * 4 + SUFFIXES),
).map(lambda c: Cut(c.source, c.keep, c.source if c.suffix == "own" else c.suffix))


@given(case=cuts, encode_with=st.sampled_from([None, None, "suffix", "image", "audio"]))
@example(case=Cut(".png", 1.0, ".wav"), encode_with="suffix").via("a whole PNG named .wav")
@example(case=Cut(".wav", 1.0, ".png"), encode_with="suffix").via("a whole WAV named .png")
@example(case=Cut(".jpg", 0.5, ".jpg"), encode_with="suffix").via("half a JPEG")
@example(case=Cut(".mp4", 0.5, ".mp4"), encode_with=None).via("half an MP4")
@example(case=Cut(".flac", 1.0, ".ogg"), encode_with="suffix").via("a FLAC named .ogg")
@example(case=Cut(".jpg", 0, ".png"), encode_with="suffix").via("an empty file")
@settings(deadline=None)  # the worker's per-call timeout guards against hangs
def test_cut_and_mislabelled_real_files(worker, models, sources, scratch, case: Cut, encode_with):
    read_everything(worker, models, case.make(scratch(), sources), encode_with)


@given(size=st.sampled_from([1, 2, 7, 64, 1000, 5000]), seed=st.integers(0, 2**32 - 1),
       suffix=st.sampled_from(SUFFIXES), encode_with=st.sampled_from([None, "suffix"]))
@settings(deadline=None)
def test_random_bytes(worker, models, scratch, size, seed, suffix, encode_with):
    folder = scratch()
    folder.mkdir()
    path = folder / f"random{suffix}"
    path.write_bytes(random.Random(seed).randbytes(size))
    read_everything(worker, models, path, encode_with)


# -- headers that claim huge sizes -------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` RGB pixels, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG with its frame header's size replaced."""
    at = next(i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC1, 0xC2))
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def wav_header(frames: int, channels: int, rate: int, data: bytes = b"\x01\x00" * 500) -> bytes:
    """A 16-bit PCM WAV whose header claims ``frames`` frames (its data is ``data``)."""
    size = frames * channels * 2 & 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2 & 0xFFFFFFFF, channels * 2 & 0xFFFF, 16)
    return (b"RIFF" + struct.pack("<I", (36 + size) & 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", size) + data)


def flac_claiming(flac: bytes, rate: int, total: int) -> bytes:
    """A real FLAC with the sample rate and total sample count of its STREAMINFO replaced."""
    bits = int.from_bytes(flac[18:26], "big")
    bits = (rate << 44) | (bits & ((1 << 44) - 1) & ~((1 << 36) - 1)) | total
    return flac[:18] + bits.to_bytes(8, "big") + flac[26:]


def avi_claiming(width: int, height: int) -> bytes:
    """A 3-frame 16x16 raw-video AVI whose headers claim ``width x height``."""
    import av  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tvq_fuzz_{os.getpid()}.avi"
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("rawvideo", rate=10)
        s.width, s.height, s.pix_fmt = 16, 16, "bgr24"
        for i in range(3):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), 40 * i, np.uint8), format="rgb24")))
        c.mux(s.encode())
    data = bytearray(path.read_bytes())
    path.unlink()
    a = data.index(b"avih") + 8
    data[a + 32 : a + 40] = struct.pack("<II", width, height)
    s = data.index(b"strf") + 8
    data[s + 4 : s + 12] = struct.pack("<ii", width, height)
    return bytes(data)


@dataclass(frozen=True)
class Bomb:
    """A header of ``kind`` claiming ``a`` x ``b`` (pixels; WAV: frames and sample rate;
    FLAC: sample rate and total samples), saved as ``name``."""

    kind: str
    a: int
    b: int
    name: str = ""

    def make(self, folder: Path, sources: dict[str, bytes]) -> Path:
        data = {
            "png": lambda: png_header(self.a, self.b),
            "jpeg": lambda: jpeg_claiming(sources[".jpg"], self.a, self.b),
            "wav": lambda: wav_header(self.a, 1, self.b),
            "flac": lambda: flac_claiming(sources[".flac"], self.a, self.b),
            "avi": lambda: avi_claiming(self.a, self.b),
        }[self.kind]()
        folder.mkdir(parents=True)
        path = folder / (self.name or f"bomb.{self.kind}")
        path.write_bytes(data)
        return path


bombs = st.one_of(
    st.builds(Bomb, st.just("png"), st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
    st.builds(Bomb, st.just("jpeg"), st.integers(1, 65535), st.integers(1, 65535)),
    st.builds(Bomb, st.just("wav"), st.integers(0, 2**32 - 1), st.integers(1, 2**32 - 1)),
    st.builds(Bomb, st.just("flac"), st.integers(1, 2**20 - 1), st.integers(0, 2**36 - 1)),
    st.builds(Bomb, st.just("avi"), st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
)


@given(case=bombs, encode_with=st.sampled_from([None, "suffix"]))
@example(case=Bomb("png", 100_000, 100_000), encode_with="suffix").via("PIL's DecompressionBombError escaped the readers")
@example(case=Bomb("png", 2**31 - 1, 1), encode_with="suffix")
@example(case=Bomb("png", 5000, 5000), encode_with="suffix").via("over MAX_PIXELS: refused from the header")
@example(case=Bomb("png", 1, 1), encode_with="suffix").via("a 1x1 image: the tokenizer's refusal named no file")
@example(case=Bomb("png", 1, 93_769_991), encode_with=None).via("PIL only warns below 179 million pixels: 3 GB asked")
@example(case=Bomb("jpeg", 65535, 65535), encode_with="suffix")
@example(case=Bomb("wav", 2**31, 16000), encode_with="suffix").via("2^31 samples declared, 500 present")
@example(case=Bomb("wav", 500, 2**31 - 1), encode_with="suffix").via("a 2^31 Hz rate: the resampler's kernel needed 10^14 numbers")
@example(case=Bomb("wav", 500, 11127), encode_with="suffix").via("11127 Hz, coprime with 16000: a 1.4 GB resampling kernel")
@example(case=Bomb("flac", 1_048_575, 2**36 - 1), encode_with="suffix").via("2^36 samples declared: 256 GiB asked of numpy")
@example(case=Bomb("avi", 100_000, 100_000), encode_with="suffix")
@example(case=Bomb("wav", 500, 2**31 - 1, "claims.png"), encode_with="suffix").via("a WAV bomb named as an image")
@settings(deadline=None)
def test_headers_claiming_huge_sizes(worker, models, sources, scratch, case: Bomb, encode_with):
    read_everything(worker, models, case.make(scratch(), sources), encode_with)


# -- folders and missing paths -----------------------------------------------------------
@dataclass(frozen=True)
class Folder:
    """A folder named ``name`` with ``frames`` copies of a real JPEG frame (the last
    cut to ``last_keep`` of its bytes) named ``0000.jpg``, ... and ``fps`` written to
    ``fps.txt`` (``None``: no such file); ``missing``: the path is not created."""

    name: str = "clip"
    frames: int = 0
    last_keep: float = 1.0
    fps: bytes | None = None
    missing: bool = False

    def make(self, folder: Path, sources: dict[str, bytes]) -> Path:
        folder.mkdir(parents=True)
        path = folder / self.name
        if self.missing:
            return path
        path.mkdir()
        frame = sources["frame"]
        for i in range(self.frames):
            keep = len(frame) if i < self.frames - 1 else int(len(frame) * self.last_keep)
            (path / f"{i:04d}.jpg").write_bytes(frame[:keep])
        if self.fps is not None:
            (path / "fps.txt").write_bytes(self.fps)
        return path


folders = st.builds(
    Folder,
    name=st.sampled_from(["clip", "clip.mp4", "photo.png", "speech.wav", "x.jpg", "clip.mkv"]),
    frames=st.sampled_from([0, 1, 2, 8, 9]),
    last_keep=st.sampled_from([1.0, 1.0, 0.5, 0.0]),
    fps=st.sampled_from([None, b"25", b"29.97", b"0", b"-3", b"nan", b"inf", b"1e400", b"abc", b"", b"\xff\xfe"]),
    missing=st.sampled_from([False, False, False, True]),
)


@given(case=folders, encode_with=st.sampled_from([None, "suffix", "video"]))
@example(case=Folder("clip", 2, fps=b"abc"), encode_with="video").via("a bad fps.txt: a float() error that named no file")
@example(case=Folder("clip", 2, fps=b"nan"), encode_with="video").via("fps.txt 'nan' was taken as the frame rate")
@example(case=Folder("clip", 2, fps=b"\xff\xfe"), encode_with="video").via("fps.txt not UTF-8: UnicodeDecodeError")
@example(case=Folder("photo.png"), encode_with="suffix").via("a directory named like an image")
@example(case=Folder("speech.wav", missing=True), encode_with="suffix").via("a missing file")
@settings(deadline=None)
def test_folders_and_missing_paths(worker, models, sources, scratch, case: Folder, encode_with):
    read_everything(worker, models, case.make(scratch(), sources), encode_with)


def test_resampling_by_neighbours_is_the_polyphase_sum():
    """The per-output-sample path (taken for coprime rates whose polyphase kernel would
    be huge) computes the same sum as the polyphase ``conv1d``."""
    x = torch.randn(2, 3001, generator=torch.Generator().manual_seed(0))
    for orig, new in [(44100, 16000), (8000, 16000), (22050, 16000)]:
        g = math.gcd(orig, new)
        n, o = new // g, orig // g
        cutoff = 0.95 * min(1.0, n / o)
        width = math.ceil(16 / cutoff)
        direct = _resample_by_neighbours(x, n, o, cutoff, width, math.ceil(3001 * n / o))
        torch.testing.assert_close(direct, resample(x, orig, new), atol=2e-6, rtol=0)
    y = resample(x, 11127, 16000)  # coprime: the per-sample path, no 1.4 GB kernel
    assert y.shape == (2, math.ceil(3001 * 16000 / 11127)) and torch.isfinite(y).all()


def test_tokenizer_refusals_in_tvq_encode_name_the_file(models, tmp_path, capsys):
    """Media the readers accept and the tokenizer refuses (under 8x8 pixels): the error
    names the file, which the tokenizer's own message cannot."""
    small = save_image(torch.rand(3, 4, 4), tmp_path / "small.png")
    assert main(["encode", str(small), "-o", str(tmp_path / "t.tvq"), "--model", str(models["image"]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "small.png" in err and "8x8" in err
