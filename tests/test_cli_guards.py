"""What is already written survives a failed run, and bad requests are one clear line: an
export that was to replace another and failed puts it back; eval never scores its own
report; a damaged shard names its files; defaults follow the data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from PIL import Image
from test_tokenizer import tiny
from testdata import interrupt_at_call, shared_path, small_photos

from tokenizers_vq.cli import main
from tokenizers_vq.export import TokenDataset


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    """The line ``tvq`` ended with on stderr (after any progress bar), checked to be its only
    message and no traceback."""
    err = capsys.readouterr().err.strip()
    said = [line for line in err.splitlines() if line.startswith("tvq: ")]
    assert "Traceback" not in err and len(said) == 1 and err.splitlines()[-1] == said[0], err
    return said[0]


@pytest.fixture()
def image_model(tmp_path):
    return tiny("image").save_pretrained(tmp_path / "model")


def test_a_failed_overwrite_puts_the_earlier_export_back(tmp_path, image_model, capsys):
    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 6)
    cmd = ["export", "--model", str(image_model), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main([*cmd, "--shard-items", "2"]) == 0
    before = snapshot(out)
    bad = data / "zz_cut.png"  # read last: the new run has written shards when it fails
    bad.write_bytes((data / sorted(p.name for p in data.iterdir())[0]).read_bytes()[:300])
    capsys.readouterr()
    assert main([*cmd, "--shard-items", "2", "--overwrite"]) == 2
    assert "zz_cut.png" in one_error_line(capsys)
    assert snapshot(out) == before  # the finished export, whole, and nothing of the failed run
    bad.unlink()
    assert main([*cmd, "--shard-items", "3", "--overwrite"]) == 0
    assert not (out / ".replaced").exists()
    assert TokenDataset(out).manifest["items_per_shard"] == [3, 3]


def test_a_replacement_cut_short_keeps_the_finished_export_until_the_next_one_finishes(tmp_path, image_model):
    from tokenizers_vq.export_record import set_aside  # noqa: PLC0415

    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 4)
    cmd = ["export", "--model", str(image_model), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main([*cmd, "--shard-items", "2"]) == 0
    finished = snapshot(out)
    set_aside(out)  # as a killed overwrite leaves it: the old export aside, a new one begun
    (out / "export.json").write_text("{}")
    (out / ".shard_00000.tvq-tmp-ab12cd34.bin").write_bytes(b"cut")  # a write the kill cut short
    assert snapshot(out / ".replaced") == finished
    set_aside(out)  # a second overwrite run: the unfinished files go, the finished export stays aside
    assert snapshot(out / ".replaced") == finished and [p.name for p in out.iterdir()] == [".replaced"]
    assert main([*cmd, "--shard-items", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "manifest.json", "shard_00000.bin",
                                                     "shard_00000.json"]


def test_a_damaged_shard_index_names_its_files_and_the_way_to_encode_it_again(tmp_path, image_model, capsys):
    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 4)
    cmd = ["export", "--model", str(image_model), "--data", str(data), "--out", str(out), "--device", "cpu",
           "--shard-items", "2"]
    assert main(cmd) == 0
    whole = snapshot(out)
    (out / "shard_00001.json").write_text('{"items": [')
    capsys.readouterr()
    assert main(cmd) == 2
    err = one_error_line(capsys)
    assert f"corrupt {out / 'shard_00001.json'}" in err and f"delete {out / 'shard_00001'}.*" in err
    for p in out.glob("shard_00001.*"):
        p.unlink()
    assert main(cmd) == 0
    assert snapshot(out) == whole  # that shard encoded again, the same bytes


def test_eval_never_scores_its_own_report_and_refuses_a_negative_count(tmp_path, image_model, capsys):
    data = tmp_path / "photos"
    small_photos(data, 2)
    cmd = ["eval", "--model", str(image_model), "--data", str(data), "--out", str(data / "report"), "--device", "cpu"]
    for _ in range(2):  # the second run finds the first one's pictures under --data
        assert main(cmd) == 0
        metrics = json.loads((data / "report" / "metrics.json").read_text())
        assert metrics["summary"]["items"] == 2
    capsys.readouterr()
    assert main([*cmd, "--max-items", "-1"]) == 2
    assert "--max-items -1" in one_error_line(capsys)


@pytest.mark.parametrize("args,named", [
    (["export", "--batch-size", "0"], "--batch-size 0"), (["export", "--workers", "-2"], "--workers -2"),
    (["prior", "--steps", "-1"], "--steps -1"), (["prior", "--window", "0"], "--window 0"),
    (["prior", "--top-k", "-3"], "--top-k -3"), (["prior", "--max-minutes", "-1"], "--max-minutes -1"),
    (["prior", "--max-minutes", "nan"], "--max-minutes nan"),
])
def test_bad_counts_are_one_line_naming_the_option(tmp_path, capsys, args, named):
    place = ["--data", str(tmp_path), "--out", str(tmp_path / "o")] if args[0] == "export" else ["--tokens", str(tmp_path)]
    assert main([*args, *place]) == 2
    assert named in one_error_line(capsys)


@pytest.mark.parametrize("args", [["encode", "a.png", "-o", "a.tvq", "--quality", "5"], ["decode", "a.tvq", "-o", "b", "--x"]])
def test_an_unknown_option_is_named_with_its_commands_usage(args, capsys):
    """The usage printed is the command's own (where its options are), not the list of commands."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"usage: tvq {args[0]} " in err and "{demo," not in err
    assert f"tvq {args[0]}: error: unrecognized arguments: {' '.join(args[4:])}" in err and f"tvq {args[0]} --help" in err


@pytest.mark.parametrize("args,said", [
    (["--device=cpu", "encode", "a.png", "-o", "a.tvq"], "tvq encode: error: unrecognized arguments: --device=cpu "
                                                         "(options go after the command)"),
    (["train", "--steps=1", "image"], "tvq train: error: unrecognized arguments: --steps=1 (overrides go after the config)"),
])
def test_an_option_in_the_wrong_place_says_where_it_goes(args, said, capsys):
    with pytest.raises(SystemExit):
        main(args)
    assert said in capsys.readouterr().err


def test_the_prior_refuses_a_model_that_did_not_write_the_tokens(tmp_path, image_model, capsys):
    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 2)
    assert main(["export", "--model", str(image_model), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["prior", "--tokens", str(out), "--model", "speech", "--steps", "1", "--device", "cpu"]) == 2
    assert "holds image tokens" in one_error_line(capsys)


def test_the_prior_refuses_the_embedded_model_taken_for_one_of_its_name_with_other_weights(tmp_path, capsys):
    from test_tokenizer import TINY  # noqa: PLC0415

    from tokenizers_vq.tokenizer import QuantizerConfig, Tokenizer, TokenizerConfig  # noqa: PLC0415

    name = Tokenizer.from_pretrained("image").config.name  # retrained under the embedded model's name
    mine = Tokenizer(TokenizerConfig("image", TINY["image"], QuantizerConfig("vq", {"codebook_size": 1024}), name=name))
    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 2)
    assert main(["export", "--model", str(mine.save_pretrained(tmp_path / "mine")), "--data", str(data), "--out",
                 str(out), "--device", "cpu"]) == 0
    capsys.readouterr()  # its pictures would be sampled through the embedded decoder: refused, as decode does
    assert main(["prior", "--tokens", str(out), "--steps", "1", "--window", "2", "--device", "cpu",
                 "--out", str(tmp_path / "prior")]) == 2
    assert "with other weights than" in one_error_line(capsys) and not (tmp_path / "prior").exists()
    assert main(["prior", "--tokens", str(out), "--model", str(tmp_path / "mine"), "--steps", "2", "--window", "2",
                 "--device", "cpu", "--out", str(tmp_path / "prior"), "--max-minutes", "1e-9"]) == 0
    assert "--max-minutes stopped it at step 1 of 2" in capsys.readouterr().out


def test_options_that_do_nothing_or_name_absent_files_are_said(tmp_path, image_model, capsys):
    import numpy as np  # noqa: PLC0415

    clip = tmp_path / "a.wav"
    sf.write(clip, 0.1 * np.sin(np.arange(8000) / 5.0), 16000)
    assert main(["encode", str(clip), "--max-pixels", "10", "-o", str(tmp_path / "a.tvq"), "--device", "cpu"]) == 0
    assert "tvq: warning: --max-pixels is not used here (audio has no pixels)" in capsys.readouterr().err
    photos = tmp_path / "photos"
    small_photos(photos, 1)
    assert main(["eval", "--model", str(image_model), "--data", str(photos), "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--fid-weights", str(tmp_path / "absent.pth")]) == 1
    assert "absent.pth" in one_error_line(capsys) and not (tmp_path / "r").exists()
    (tmp_path / "photo.png").write_bytes(next(photos.iterdir()).read_bytes())
    assert main(["demo", str(tmp_path / "photo.png"), "--steps", "100000", "--out", str(tmp_path / "photo.png")]) == 2
    assert "is a file" in one_error_line(capsys)  # at once, not after the training


def test_export_and_eval_pick_the_model_by_the_folders_media(tmp_path):
    from tokenizers_vq.cli import _default_for_folder  # noqa: PLC0415

    speech = tmp_path / "talks"
    speech.mkdir()
    wav, sr = sf.read(str(sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]))
    sf.write(speech / "a.wav", wav, sr)
    frames = tmp_path / "clips" / "c1"  # a clip as numbered frames
    small_photos(frames, 8)
    for i, p in enumerate(sorted(frames.iterdir())):
        p.rename(frames / f"{i:04d}.png")
    photos = tmp_path / "photos"
    small_photos(photos, 1)
    assert _default_for_folder(str(speech)) == "speech"
    assert _default_for_folder(str(tmp_path / "clips")) == "video"
    assert _default_for_folder(str(photos)) == "image"
    report = speech / "report"  # an eval's pictures written inside the folder it evaluates
    small_photos(report, 1)
    assert _default_for_folder(str(speech)) == "image"
    assert _default_for_folder(str(speech), skip={report.resolve()}) == "speech"
    sf.write(tmp_path / "clips" / "b.wav", wav, sr)
    with pytest.raises(ValueError, match="holds audio and video files"):
        _default_for_folder(str(tmp_path / "clips"))


def test_an_interrupted_command_is_one_line(tmp_path, monkeypatch, capsys):
    from tokenizers_vq import cli  # noqa: PLC0415

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_example_photo", interrupted)
    assert main(["example-photo"]) == 130
    line = one_error_line(capsys)
    assert "interrupted (files already written are complete)" in line and "export" not in line
    monkeypatch.setattr(cli, "_train", interrupted)  # (before its loop, which names its checkpoint itself)
    assert main(["train", "image", f"--out_dir={tmp_path}"]) == 130
    assert "training resumes from its last checkpoint when run again" in one_error_line(capsys)


def test_a_write_that_lands_short_raises(tmp_path, monkeypatch):
    import builtins  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from tokenizers_vq import io  # noqa: PLC0415

    class Short:  # a file whose writes store half of what they are given, without an error
        def __init__(self, f):
            self.f = f

        def write(self, data):
            return self.f.write(memoryview(data)[: len(data) // 2])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(io, "open", lambda path, mode: Short(builtins.open(path, mode)), raising=False)
    with pytest.raises(OSError, match="of 20000 bytes written"):
        io.write_bytes(np.arange(10000, dtype="<u2"), tmp_path / "x.bin")


def test_a_short_write_is_an_error_not_a_short_file(tmp_path):
    script = """
import resource, signal, sys
import numpy as np
from pathlib import Path
from tokenizers_vq.io import atomic_write, write_bytes
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
target = Path(sys.argv[1])
try:
    atomic_write(target, lambda tmp: write_bytes(np.arange(10000, dtype="<u2"), tmp))
except OSError as e:
    print("refused", e.errno)
print(sorted(p.name for p in target.parent.iterdir()))
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "shard.bin")], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].startswith("refused") and out[1] == "[]"  # no file at all, not a short one


@pytest.mark.parametrize("config,over,named", [
    ("a: [1,\n", [], "is not valid YAML"), ("5\n", [], "not a mapping of sections"),
    (b"\xff\xd8\xff\xe0 a photo", [], "is not a text file: tvq train's first argument is a YAML config"),
    (None, ["--steps=-5"], "steps=-5"), (None, ["--batch_size=0"], "batch_size=0"),
])
def test_a_bad_training_config_is_one_line(tmp_path, capsys, config, over, named):
    path = tmp_path / "c.yaml"
    if config is None:
        path = Path(__file__).resolve().parents[1] / "train" / "configs" / "image.yaml"
    else:
        path.write_bytes(config if isinstance(config, bytes) else config.encode())
    assert main(["train", str(path), *over]) == 2
    assert named in one_error_line(capsys)


@pytest.mark.parametrize("config", ['{"modality": "image", "backbone": null}', "[1, 2]", b"\xff\xfe{"])
def test_a_damaged_model_config_names_the_file(tmp_path, config):
    from tokenizers_vq.tokenizer import Tokenizer  # noqa: PLC0415

    folder = tiny("image").save_pretrained(tmp_path / "model")
    (folder / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(ValueError, match=f"corrupt {folder / 'config.json'}"):
        Tokenizer.from_pretrained(folder)


def test_a_file_that_is_not_weights_is_named_as_such(tmp_path):
    from tokenizers_vq.weights import load_weights  # noqa: PLC0415

    photo = small_photos(tmp_path / "p", 1)[0]
    with pytest.raises(ValueError, match=f"{photo} is not a PyTorch weights file of tensors \\(LPIPS"):
        load_weights(photo, "LPIPS v0.1 linear heads")
    import torch  # noqa: PLC0415

    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds list, not the state dict"):
        load_weights(tmp_path / "list.pth", "LPIPS v0.1 linear heads")
    torch.save({"w": 5}, tmp_path / "int.pth")
    with pytest.raises(ValueError, match="holds a dict of values other than tensors, not the state dict"):
        load_weights(tmp_path / "int.pth", "LPIPS v0.1 linear heads")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(load_weights(tmp_path / "ok.pth", "x")["w"], torch.ones(2))
    torch.save({f"w{i}": torch.randn(1000) for i in range(20)}, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    for cut in range(1, 20):  # a download that stopped anywhere
        (tmp_path / "cut.pth").write_bytes(whole[: len(whole) * cut // 20])
        with pytest.raises(ValueError, match="cut.pth is not a PyTorch weights file.*download it again"):
            load_weights(tmp_path / "cut.pth", "torchvision VGG16 weights")


def test_a_file_given_as_the_data_folder_is_named_as_a_file(tmp_path, capsys):
    photo = small_photos(tmp_path / "p", 1)[0]
    assert main(["eval", "--data", str(photo), "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert f"{photo} is a file, not a folder" in one_error_line(capsys)


def test_a_shard_with_a_token_past_the_codebook_is_named_before_the_prior_trains(tmp_path, image_model, capsys):
    import numpy as np  # noqa: PLC0415

    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 2)
    assert main(["export", "--model", str(image_model), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--shard-items", "1"]) == 0
    dtype = np.dtype(json.loads((out / "manifest.json").read_text())["dtype"])
    codes = np.fromfile(out / "shard_00001.bin", dtype=dtype)
    codes[3] = np.iinfo(dtype).max  # a flipped word: the manifest's counts still agree
    codes.tofile(out / "shard_00001.bin")
    capsys.readouterr()
    assert main(["prior", "--tokens", str(out), "--model", str(image_model), "--steps", "1", "--device", "cpu",
                 "--window", "2", "--out", str(tmp_path / "prior")]) == 2
    assert f"{out / 'shard_00001'}.bin holds token {np.iinfo(dtype).max}" in one_error_line(capsys)


def test_an_interrupted_overwrite_resumes_and_keeps_the_replaced_export_until_it_finishes(tmp_path, image_model,
                                                                                       monkeypatch):
    from tokenizers_vq import export  # noqa: PLC0415

    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 4)
    cmd = ["export", "--model", str(image_model), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main([*cmd, "--shard-items", "2"]) == 0
    finished = snapshot(out)
    write = export._write_shard
    interrupt_at_call(monkeypatch, export, "_write_shard", 2)
    assert main([*cmd, "--shard-items", "1", "--overwrite"]) == 130
    assert snapshot(out / ".replaced") == finished and (out / "shard_00000.bin").is_file()
    monkeypatch.setattr(export, "_write_shard", write)
    assert main([*cmd, "--shard-items", "1"]) == 0  # resumes the new export
    assert not (out / ".replaced").exists() and TokenDataset(out).manifest["items_per_shard"] == [1, 1, 1, 1]


def test_the_prior_without_a_model_refuses_tokens_no_embedded_model_wrote(tmp_path, capsys):
    mine = tiny("image")
    mine.config.name = "my-own-model"
    model = mine.save_pretrained(tmp_path / "model")
    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 2)
    assert main(["export", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["prior", "--tokens", str(out), "--steps", "1", "--device", "cpu"]) == 2
    assert "'my-own-model', which is not one of the embedded models" in one_error_line(capsys)


def as_recorded_before_upright_reading(record: Path, key: str) -> None:
    """An export record as written before inputs were read upright: without ``key``."""
    fp = json.loads(record.read_text())
    assert fp.pop(key) in ("upright", "upright, srgb", "upright, srgb, palettes")
    record.write_text(json.dumps(fp))


def refused_as_turned(cmd: list[str], record: Path, turned: Path, capsys) -> None:
    """The second input, ``turned`` now, recorded as if it had been so all along: the resume is refused."""
    stat = turned.stat()
    fp = json.loads(record.read_text())
    fp["inputs"][1][1:] = [stat.st_size, stat.st_mtime_ns]
    record.write_text(json.dumps(fp))
    capsys.readouterr()
    assert main(cmd) == 2
    assert f"{turned} is turned or could not be checked" in one_error_line(capsys)


def _three_photo_export(tmp_path: Path, image_model) -> tuple[list[Path], list[str], Path]:
    """Three small photos exported in shards of 2: the photos, the command, its export.json."""
    data, out = tmp_path / "photos", tmp_path / "tokens"
    photos = small_photos(data, 3)
    cmd = ["export", "--model", str(image_model), "--data", str(data), "--out", str(out), "--device", "cpu",
           "--shard-items", "2"]
    assert main(cmd) == 0
    return photos, cmd, out / "export.json"


def test_an_export_begun_before_photos_were_read_upright_resumes_unless_one_is_turned(tmp_path, image_model, capsys):
    from PIL import Image  # noqa: PLC0415

    photos, cmd, record = _three_photo_export(tmp_path, image_model)
    as_recorded_before_upright_reading(record, "image_reader")
    assert main(cmd) == 0  # no photo is turned: nothing differs for it
    assert json.loads(record.read_text())["image_reader"] == "upright, srgb, palettes"
    as_recorded_before_upright_reading(record, "image_reader")
    with Image.open(photos[1]) as im:
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(photos[1], exif=exif)
    refused_as_turned(cmd, record, photos[1], capsys)


def test_an_export_begun_before_colours_were_read_in_srgb_resumes_unless_a_photo_reads_otherwise(tmp_path, image_model,
                                                                                                    capsys):
    from PIL import Image  # noqa: PLC0415

    photos, cmd, record = _three_photo_export(tmp_path, image_model)
    recorded = json.loads(record.read_text())
    record.write_text(json.dumps({**recorded, "image_reader": "upright"}))  # as colours were read before
    assert main(cmd) == 0  # no photo has a colour profile or key: nothing differs for it
    assert json.loads(record.read_text())["image_reader"] == "upright, srgb, palettes"
    record.write_text(json.dumps({**recorded, "image_reader": "upright"}))
    with Image.open(photos[1]) as im:
        im.convert("RGB").save(photos[1], transparency=(0, 0, 0))  # a colour key: it reads otherwise now
    stat = photos[1].stat()
    recorded["inputs"][1][1:] = [stat.st_size, stat.st_mtime_ns]
    record.write_text(json.dumps({**recorded, "image_reader": "upright"}))
    capsys.readouterr()
    assert main(cmd) == 2
    assert f"{photos[1]} reads otherwise now or could not be checked" in one_error_line(capsys)


def test_a_video_export_begun_before_clips_were_read_upright_resumes_unless_one_is_turned(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (which writes the display matrix) is not installed")
    from tokenizers_vq.media import load_video, save_video  # noqa: PLC0415

    model = tiny("video").save_pretrained(tmp_path / "model")
    data, out = tmp_path / "clips", tmp_path / "tokens"
    data.mkdir()
    frames, fps = load_video(shared_path("video", "imageio_realshort.mp4"), max_frames=5)
    for i in range(2):
        save_video(frames[:, :, 16 * i : 16 * i + 32, :32], data / f"clip{i}.mp4", fps)
    cmd = ["export", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main(cmd) == 0
    record = out / "export.json"
    as_recorded_before_upright_reading(record, "video_reader")
    assert main(cmd) == 0  # no clip is turned: nothing differs for it
    assert json.loads(record.read_text())["video_reader"] == "upright"
    as_recorded_before_upright_reading(record, "video_reader")
    turned = data / "clip1.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(turned), "-c", "copy", "-metadata:s:v:0",
                    "rotate=90", str(tmp_path / "turned.mp4")], check=True)
    shutil.copyfile(tmp_path / "turned.mp4", turned)
    refused_as_turned(cmd, record, turned, capsys)


def test_encoding_a_video_with_sound_says_the_sound_is_not_coded(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from tokenizers_vq.media import load_video, save_video  # noqa: PLC0415

    frames, fps = load_video(shared_path("video", "imageio_realshort.mp4"), max_frames=5)
    silent = tmp_path / "silent.mp4"
    save_video(frames[:, :, :64, :64], silent, fps)  # our writer keeps no sound
    sounding = tmp_path / "sounding.mp4"
    shutil.copy(shared_path("video", "imageio_realshort.mp4"), sounding)
    model = tiny("video").save_pretrained(tmp_path / "model")
    for clip, said in ((silent, False), (sounding, True)):
        capsys.readouterr()
        assert main(["encode", str(clip), "--model", str(model), "-o", str(tmp_path / "v.tvq"), "--device", "cpu",
                     "--max-pixels", "0"]) == 0
        assert ("also has sound" in capsys.readouterr().err) is said


def test_decoding_a_video_of_odd_size_says_what_h264_cut(tmp_path, capsys):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from PIL import Image  # noqa: PLC0415

    from tokenizers_vq.media import load_video  # noqa: PLC0415

    frames, _ = load_video(shared_path("video", "imageio_realshort.mp4"), max_frames=5)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames[:, :, :25, :33]):  # 33 x 25 pixels
        Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i:03d}.png")
    (folder / "fps.txt").write_text("25")
    model = tiny("video").save_pretrained(tmp_path / "model")
    tokens, out = tmp_path / "v.tvq", tmp_path / "v.mp4"
    assert main(["encode", str(folder), "--model", str(model), "-o", str(tokens), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(model), "-o", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"{out} is 32x24 pixels, not the 33x25 its tokens record" in err and "H.264 codes even sizes" in err
    assert tuple(load_video(out)[0].shape[2:]) == (24, 32)


def test_a_manifest_missing_a_field_is_named(tmp_path, image_model):
    data, out = tmp_path / "photos", tmp_path / "tokens"
    small_photos(data, 2)
    assert main(["export", "--model", str(image_model), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["dtype"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json: it lacks dtype"):
        TokenDataset(out)


def test_eval_names_a_file_it_cannot_read_and_measures_the_others_and_no_earlier_report(tmp_path, image_model,
                                                                                        capsys):
    data = tmp_path / "photos"
    photos = small_photos(data, 2)
    (data / "cut.png").write_bytes(photos[0].read_bytes()[:300])
    for report in ("first", "second"):  # the second run finds the first report's pictures under --data
        assert main(["eval", "--model", str(image_model), "--data", str(data), "--out", str(data / report),
                     "--device", "cpu"]) == 0
        metrics = json.loads((data / report / "metrics.json").read_text())
        assert metrics["summary"]["items"] == 2 and [Path(e["file"]).name for e in metrics["failed"]] == ["cut.png"]
    out = capsys.readouterr().out
    assert "left out: cannot read image" in out and "cut.png" in out
    assert "## Files left out (1: not read, or not scored)" in (data / "second" / "report.md").read_text()


def test_eval_leaves_out_a_training_runs_samples_under_its_data(tmp_path, image_model, capsys):
    data = tmp_path / "photos"
    small_photos(data, 2)
    run = data / "runs" / "first"
    small_photos(run / "samples", 3)  # a run's reconstructions: not held-apart photos
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["eval", "--model", str(image_model), "--data", str(data), "--out", str(tmp_path / "report"),
                 "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["summary"]["items"] == 2 and not metrics["failed"]


def test_pesq_of_a_reference_without_speech_is_left_out_with_its_reason():
    pytest.importorskip("pesq", reason="the pesq package scores PESQ")
    import torch  # noqa: PLC0415

    from tokenizers_vq.eval.metrics import audio_metrics  # noqa: PLC0415

    silence = torch.zeros(16000)
    m = audio_metrics(silence, silence, 16000)
    assert m["pesq_wb"] is None and m["pesq_wb_note"] == "PESQ not computed: NoUtterancesError"


def test_eval_rerun_with_fewer_items_leaves_no_samples_of_the_earlier_run(tmp_path, capsys):
    model = tiny("audio").save_pretrained(tmp_path / "model")
    data, out = tmp_path / "speech", tmp_path / "report"
    data.mkdir()
    for f in sorted(shared_path("audio", "fsdd").glob("*.wav"))[:2]:
        shutil.copyfile(f, data / f.name)
    cmd = ["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main(cmd) == 0
    assert (out / "samples" / "1_reconstruction.wav").is_file()
    assert main([*cmd, "--max-items", "1"]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir() if p.name[0].isdigit()) == [
        "0_original.wav", "0_reconstruction.wav", "0_spectrogram.png"]
    # an image run into the same folder keeps none of the speech run's samples, and the reverse
    image = tiny("image").save_pretrained(tmp_path / "image_model")
    photos = small_photos(tmp_path / "photos", 2)[0].parent
    image_cmd = ["eval", "--model", str(image), "--data", str(photos), "--device", "cpu"]
    assert main([*image_cmd, "--out", str(tmp_path / "fresh")]) == 0 and main([*image_cmd, "--out", str(out)]) == 0
    assert {p.name for p in (out / "samples").iterdir()} == {p.name for p in (tmp_path / "fresh" / "samples").iterdir()}
    assert main(cmd) == 0 and main([*cmd, "--out", str(tmp_path / "fresh_audio")]) == 0
    assert {p.name for p in (out / "samples").iterdir()} == {p.name for p in (tmp_path / "fresh_audio" / "samples").iterdir()}


def test_a_mixed_folder_names_what_a_run_leaves_out(tmp_path, capsys, image_model):
    data = tmp_path / "mixed"
    small_photos(data, 2)
    wav, sr = sf.read(str(sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]))
    for name in ("a.wav", "b.wav", "c.wav"):
        sf.write(data / name, wav, sr)
    assert main(["export", "--model", str(image_model), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"{data} also holds 3 audio files, left out: this run takes its image files" in err
    assert "--model speech for those" in err
    assert main(["eval", "--model", str(image_model), "--data", str(data), "--out", str(tmp_path / "report"),
                 "--device", "cpu"]) == 0  # the report says it too
    capsys.readouterr()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Not evaluated (other media in the folder, parts of files" in report
    assert "also holds 3 audio files, left out" in report
    frames = [Image.open(p).convert("RGB") for p in sorted(data.glob("*.png"))]
    frames[0].save(data / "anim.gif", save_all=True, append_images=frames[1:])  # an animation: its first frame coded
    assert main(["eval", "--model", str(image_model), "--data", str(data), "--out", str(tmp_path / "report2"),
                 "--device", "cpu"]) == 0
    assert "anim.gif is an animation of 2 frames, and an image model codes the first only" in capsys.readouterr().err
    assert "anim.gif is an animation of 2 frames" in (tmp_path / "report2" / "report.md").read_text()
    photos = tmp_path / "photos_only"
    small_photos(photos, 2)
    assert main(["export", "--model", str(image_model), "--data", str(photos), "--out", str(tmp_path / "out2"),
                 "--device", "cpu"]) == 0
    assert "left out" not in capsys.readouterr().err
    # a folder of numbered frames beside the photos: its frames are images, coded as photos, and said so
    clip = photos / "clip"
    clip.mkdir()
    frame = next(photos.glob("*.png")).read_bytes()
    for i in range(9):
        (clip / f"{i:03d}.png").write_bytes(frame)
    (clip / "fps.txt").write_text("25")
    assert main(["export", "--model", str(image_model), "--data", str(photos), "--out", str(tmp_path / "out3"),
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"{photos} holds 1 folder of numbered frames (video clips?), whose frames are coded as photos" in err
    assert "left out" not in err


@pytest.mark.parametrize("command", ["export", "eval"])
def test_an_output_folder_that_cannot_be_made_is_named_in_one_line(command, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    photos = small_photos(tmp_path / "p", 1)[0].parent
    assert main([command, "--data", str(photos), "--out", str(tmp_path / "afile" / "out")]) == 2
    line = one_error_line(capsys)
    assert f"cannot write {tmp_path / 'afile' / 'out'}" in line and "is a file, not a directory" in line
    assert (tmp_path / "afile").read_text() == "x"


def test_an_empty_file_name_is_named_as_such(tmp_path, capsys):
    """A command substitution that printed nothing gives ``tvq encode ""``: named, not read as the folder "."."""
    assert main(["encode", "", "-o", str(tmp_path / "x.tvq")]) == 2
    assert "tvq: error: an empty file name: name a " in capsys.readouterr().err
    assert not (tmp_path / "x.tvq").exists()
    for cmd in (["decode", "", "-o", str(tmp_path / "y.png")], ["export", "--data", "", "--out", str(tmp_path / "t")],
                ["eval", "--data", "", "--out", str(tmp_path / "r")], ["encode", str(tmp_path / "a.png"), "-o", ""]):
        assert main(cmd) == 2  # not the current folder's files
        assert "an empty file name" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()


def test_an_export_begun_before_palette_profiles_were_applied_resumes_unless_a_palette_photo_has_one(tmp_path,
                                                                                                     image_model, capsys):
    from PIL import Image  # noqa: PLC0415
    from test_media_input import _wide_gamut_profile  # noqa: PLC0415

    photos, cmd, record = _three_photo_export(tmp_path, image_model)
    recorded = json.loads(record.read_text())
    record.write_text(json.dumps({**recorded, "image_reader": "upright, srgb"}))
    assert main(cmd) == 0  # no palette photo with a profile: nothing differs
    assert json.loads(record.read_text())["image_reader"] == "upright, srgb, palettes"
    with Image.open(photos[1]) as im:
        palette = im.convert("RGB").quantize(16)
    palette.save(photos[1], icc_profile=_wide_gamut_profile())  # a palette PNG whose colours read otherwise now
    assert main(cmd + ["--overwrite"]) == 0
    record.write_text(json.dumps({**json.loads(record.read_text()), "image_reader": "upright, srgb"}))
    capsys.readouterr()
    assert main(cmd) == 2
    assert "reading palette photos' colours as stored, and this version converts them to sRGB" in capsys.readouterr().err


def test_a_run_that_diverged_ends_in_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    from tokenizers_vq.train.trainer import Trainer  # noqa: PLC0415

    def diverge(self):
        raise FloatingPointError("loss became NaN or Inf by step 3; nothing after it was saved: lower optim.lr")

    monkeypatch.setattr(Trainer, "train", diverge)
    data = tmp_path / "photos"
    small_photos(data, 2, side=32)
    args = ["train", "image", f"--data.train={data}", f"--out_dir={tmp_path / 'run'}", "--steps=1", "--data.crop=32",
            "--model.backbone.channels=8", "--sample_every=0", "--data.val=", "--data.val_fraction=0",
            "--mixed_precision=no"]  # (as every other run in this process: accelerate's state is process-wide)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("tvq: error: loss became NaN") and "Traceback" not in err
