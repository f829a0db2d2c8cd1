"""A run keeps its last good checkpoint whatever fails after it, says what a resume changes,
and refuses or warns about settings that would train on the wrong thing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from test_tokenizer import TINY
from testdata import shared_path
from trainrun import config

from tokenizers_vq import samples
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.train.config import load_config
from tokenizers_vq.train.trainer import Trainer

NO_GUARD = {"model.quantizer.options": '{"codebook_size": 64, "kmeans_init": true, "check_finite": false}'}


def test_a_failure_writing_samples_is_a_warning_after_the_checkpoint(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no room for pictures")

    monkeypatch.setattr(samples, "write", broken)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"samples of step 2 not written \(RuntimeError: no room for pictures\)"):
        Trainer(config("image", out, 2, sample_every=2, save_every=2)).train()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


def test_samples_of_audio_shorter_than_a_spectrogram_window_are_written(tmp_path):
    """A 100-sample clip: its sound and its spectrogram picture (the window reflect-pads by half)."""
    clip = tmp_path / "short.wav"
    sf.write(clip, torch.linspace(-0.5, 0.5, 100).numpy(), 16000)
    tok = Trainer(config("audio", tmp_path / "run", 1, **{"data.max_items": 1})).release_model()
    samples.write(tok, [clip], tmp_path / "samples")
    assert (tmp_path / "samples" / "0_spectrogram.png").stat().st_size > 0
    assert sf.info(tmp_path / "samples" / "0_reconstruction.wav").frames >= 100


def test_a_diverged_run_stops_before_saving_over_its_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    Trainer(config("image", out, 2, save_every=2, **NO_GUARD)).train()
    good = (out / "checkpoint" / "model" / "model.safetensors").read_bytes()
    diverging = Trainer(config("image", out, 6, save_every=1, **NO_GUARD))
    step = diverging.generator_step

    def poisoned(x):  # a weight turns NaN before step 3: its loss and update are NaN
        if diverging.step == 2:
            with torch.no_grad():
                diverging.unwrapped.decoder.last_layer.view(-1)[0] = float("nan")
        return step(x)

    diverging.generator_step = poisoned
    with pytest.raises(FloatingPointError, match=r"loss or weights became NaN or Inf by step 3; nothing after it was saved "
                                                 r"\(the checkpoint in .* is kept\): lower optim.lr"):
        diverging.train()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (out / "checkpoint" / "model" / "model.safetensors").read_bytes() == good
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert lines[-1]["loss/total"] is None


def test_a_resume_says_where_it_continues_and_what_changed(tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(config("image", out, 2, save_every=2)).train()
    capsys.readouterr()
    Trainer(config("image", out, 4, save_every=2, seed=7, init_from="image", **{"optim.lr": 1e-3}))
    said = capsys.readouterr().out
    assert f"resuming {out / 'checkpoint'} at step 2 of 4; init_from=image is not used" in said
    assert "settings changed since that checkpoint: optim.lr: 0.003 -> 0.001, seed: 0 -> 7" in said
    capsys.readouterr()
    Trainer(config("image", out, 4, save_every=2))  # only the length: nothing to name
    assert "settings changed" not in capsys.readouterr().out
    state = out / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    del meta["config"]["data"]["crop_max"]  # a checkpoint written before the setting existed
    state.write_text(json.dumps(meta))
    Trainer(config("image", out, 4, save_every=2))  # its default is what that run did
    assert "settings changed" not in capsys.readouterr().out
    Trainer(config("image", out, 4, save_every=2, **{"data.crop_max": 64}))
    assert "settings changed since that checkpoint: data.crop_max: 0 -> 64" in capsys.readouterr().out
    assert json.loads(state.read_text())["processes"] == 1  # as a checkpoint records it
    meta["processes"] = 2  # saved by two ranks, resumed by one: a step's batch is halved
    state.write_text(json.dumps(meta))
    batch = config("image", out, 4).batch_size
    Trainer(config("image", out, 4, save_every=2))
    assert f"settings changed since that checkpoint: processes: 2 -> 1 (a step's batch: {2 * batch} -> {batch})" in \
        capsys.readouterr().out


def test_a_resume_names_changed_data_and_refuses_to_hold_apart_files_it_trained_on(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    src = sorted(shared_path("images", "bsds500", "train").glob("*.jpg"))[:6]
    for f in src[:5]:
        shutil.copy(f, photos)
    out, over = tmp_path / "run", {"data.train": str(photos), "data.val": "", "data.val_fraction": 0.4, "data.max_items": 0}
    Trainer(config("image", out, 1, save_every=1, **over)).train()  # trains on 3, holds the last 2 apart
    capsys.readouterr()
    Trainer(config("image", out, 2, **over))
    assert "data changed" not in capsys.readouterr().out
    shutil.copy(src[5], photos)  # 6 files: the last 2 held apart, the 4th now trained on
    Trainer(config("image", out, 2, **over))
    assert "data changed since that checkpoint: 1 training file added, the files held apart changed" in capsys.readouterr().out
    for f in src[4:]:
        (photos / f.name).unlink()  # 4 files: the 3rd, trained on, would be held apart
    with pytest.raises(ValueError, match=rf"trained on 1 of the files this run would hold apart \({src[2].name}\): "
                                         r"data.train or data.val_fraction changed since.*--data.val=DIR"):
        Trainer(config("image", out, 2, **over))


def test_a_resume_refuses_a_validation_folder_of_files_it_trained_on(tmp_path):
    from testdata import small_photos  # noqa: PLC0415

    data = tmp_path / "photos"
    small_photos(data / "a", 2)
    small_photos(data / "b", 2)
    out = tmp_path / "run"
    Trainer(config("image", out, 1, save_every=1, **{"data.train": str(data), "data.val": ""})).train()  # all 4
    with pytest.raises(ValueError, match=r"trained on 2 of the files this run would hold apart \(b/.*data.val names "
                                         r"files inside data.train that it trained on.*--init_from"):
        Trainer(config("image", out, 2, **{"data.train": str(data), "data.val": str(data / "b")}))
    # named by another path to the same folder (absolute against relative), it is the same files
    with pytest.raises(ValueError, match="trained on 2 of the files this run would hold apart"):
        Trainer(config("image", out, 2, **{"data.train": str(data), "data.val": os.path.relpath(data / "b")}))


def test_a_resume_refuses_to_hold_apart_what_an_earlier_segment_trained_on_or_a_copy_of_it(tmp_path, capsys):
    """A checkpoint remembers every segment's training files, by name and by content: a later
    segment may not hold apart a file the first segment trained on (the second did not), nor a
    copy of one in a renamed folder. A copy this segment trains on as well is no change since."""
    from testdata import small_photos  # noqa: PLC0415

    def photos(name: str, n: int, side: int) -> list[Path]:  # other sides, other bytes; other names
        folder = tmp_path / name
        small_photos(tmp_path / "tmp", n, side)
        (tmp_path / "tmp").rename(folder)
        return [f.rename(folder / f"{name}_{f.name}") for f in sorted(folder.iterdir())]

    first, second, val = photos("first", 3, 64), photos("second", 2, 48), tmp_path / "val"
    photos("val", 1, 40)
    out, base = tmp_path / "run", {"data.val": str(val), "data.max_items": 0, "save_every": 1}
    Trainer(config("image", out, 1, **{"data.train": str(first[0].parent), **base})).train()
    Trainer(config("image", out, 2, **{"data.train": str(second[0].parent), **base})).train()
    assert "data changed since that checkpoint: 2 training files added, 3 training files left out" in capsys.readouterr().out
    # the first segment's last file held apart: the checkpoint (the second segment's) never trained on it
    with pytest.raises(ValueError, match=rf"trained on 1 of the files this run would hold apart \({first[2].name}\): "
                                         r"data.train or data.val_fraction changed since"):
        Trainer(config("image", out, 3, **{**base, "data.train": str(first[0].parent), "data.val": "", "data.val_fraction": 0.34}))
    renamed = tmp_path / "renamed"
    shutil.copytree(first[0].parent, renamed)
    with pytest.raises(ValueError, match=rf"trained on 3 of the files this run would hold apart \({first[0].name}, "
                                         r".*copies of files it trained on \(the same size and bytes\)"):
        Trainer(config("image", out, 3, **{**base, "data.train": str(second[0].parent), "data.val": str(renamed)}))
    Trainer(config("image", out, 3, **{**base, "data.train": str(second[0].parent)}))  # its own validation folder: fine
    assert "held apart changed" not in capsys.readouterr().out
    both = tmp_path / "both"
    shutil.copytree(second[0].parent, both)
    shutil.copy(first[0], both / "copy.png")  # trained on now too, as a new run would
    (renamed / first[1].name).unlink()
    (renamed / first[2].name).unlink()
    Trainer(config("image", out, 3, **{**base, "data.train": str(both), "data.val": str(renamed)}))
    assert "1 training file added, the files held apart changed" in capsys.readouterr().out


def test_fingerprints_match_copies_and_tell_files_of_one_size_apart(tmp_path):
    from tokenizers_vq.train.run_files import EDGE_BYTES, fingerprint  # noqa: PLC0415

    frames = sorted(shared_path("video", "siammask_tennis").glob("*.jpg"))[:3]
    clip = tmp_path / "clip"
    clip.mkdir()
    for f in frames:
        shutil.copy(f, clip)
    copy = tmp_path / "copy"
    shutil.copytree(clip, copy)
    assert fingerprint(copy) == fingerprint(clip) != fingerprint(clip / frames[0].name)  # a video as numbered frames
    assert fingerprint(clip).split(":")[0] == str(sum(f.stat().st_size for f in frames))
    (copy / frames[2].name).write_bytes(frames[1].read_bytes())
    assert fingerprint(copy) != fingerprint(clip)
    data = bytearray(frames[0].read_bytes())
    assert len(data) > 2 * EDGE_BYTES
    for at in (0, len(data) - 1):  # one byte changed in either end: another file of the same size
        other = bytearray(data)
        other[at] ^= 1
        (tmp_path / "other.jpg").write_bytes(other)
        assert fingerprint(tmp_path / "other.jpg") != fingerprint(frames[0])
    (tmp_path / "small.bin").write_bytes(b"abc")
    assert fingerprint(tmp_path / "small.bin").startswith("3:")


def test_a_video_run_holding_apart_a_clip_of_numbered_frames_saves_and_resumes(tmp_path):
    val = tmp_path / "val" / "tennis"
    val.mkdir(parents=True)
    for f in sorted(shared_path("video", "siammask_tennis").glob("*.jpg"))[:9]:
        shutil.copy(f, val)
    (val / "fps.txt").write_text("25")
    out, over = tmp_path / "run", {"data.val": str(val.parent), "save_every": 1}
    Trainer(config("video", out, 1, **over)).train()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["files"]["val"] == ["tennis"]
    Trainer(config("video", out, 2, **over))  # resumed, the held-apart clip is not one it trained on


def test_max_items_counts_training_files_after_a_validation_folder_inside_the_data(tmp_path):
    """``data.val`` inside ``data.train`` and first in name order: the cap is on what is left to
    train on (not on the listing, whose first files are the held-apart ones), and a file of
    data.val past the cap is not trained on either."""
    from testdata import small_photos  # noqa: PLC0415

    data = tmp_path / "photos"
    small_photos(data / "a_val", 3)
    small_photos(data / "b_train", 3)
    run = Trainer(config("image", tmp_path / "run", 1, **{"data.train": str(data), "data.val": str(data / "a_val"),
                                                             "data.max_items": 2}))
    assert [Path(f).parent.name for f in run.train_data.files] == ["b_train", "b_train"]
    assert [Path(f).parent.name for f in run.val_files] == ["a_val", "a_val"]  # (capped as its own folder)


def test_an_out_dir_inside_the_data_folder_is_not_trained_on(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted(shared_path("images", "bsds500", "train").glob("*.jpg"))[:2]:
        shutil.copy(f, photos)
    out = photos / "run"
    Trainer(config("image", out, 1, sample_every=1, save_every=1, **{"data.train": str(photos)})).train()
    assert list(out.rglob("*.png"))  # the samples are media of the data's kind
    again = Trainer(config("image", out, 2, **{"data.train": str(photos)}))
    assert [f.name for f in again.train_data.files] == sorted(f.name for f in photos.glob("*.jpg"))
    shutil.rmtree(out)
    around = Trainer(config("image", tmp_path, 1, **{"data.train": str(photos)}))  # an out_dir holding the data
    assert [f.name for f in around.train_data.files] == sorted(f.name for f in photos.glob("*.jpg"))


def test_an_init_from_may_name_a_runs_out_dir(tmp_path):
    Trainer(config("image", tmp_path / "a", 1, save_every=1)).train()
    warm = Trainer(config("image", tmp_path / "b", 1, init_from=str(tmp_path / "a")))
    src = Tokenizer.from_pretrained(tmp_path / "a" / "checkpoint" / "model")
    assert all(torch.equal(m, s) for m, s in zip(warm.unwrapped.parameters(), src.parameters(), strict=True))
    (tmp_path / "a" / "checkpoint").rename(tmp_path / "a" / "checkpoint.old")  # a save cut short keeps the last as .old
    warm = Trainer(config("image", tmp_path / "c", 1, init_from=str(tmp_path / "a")))
    assert all(torch.equal(m, s) for m, s in zip(warm.unwrapped.parameters(), src.parameters(), strict=True))


@pytest.mark.parametrize("modality,over,named", [
    ("image", {"data.crop": 30}, r"data.crop=30: the model downsamples by 4, .* use e.g. --data.crop=28"),
    ("video", {"data.clip_frames": 8}, r"data.clip_frames=8: .* 1 \+ 4k frames; use e.g. --data.clip_frames=5"),
    ("image", {"data.crop_max": 70}, r"data.crop_max=70: the model downsamples by 4, .* use e.g. --data.crop_max=72"),
    ("image", {"data.crop": 16, "loss.adversarial": 0.1},
     r"data.crop=16: the discriminator \(loss.adversarial\) takes crops of at least 24 pixels a side; use e.g. --data.crop=24"),
    ("video", {"data.crop": 16, "loss.adversarial": 0.1}, r"data.crop=16: the discriminator .* use e.g. --data.crop=24"),
])
def test_a_crop_or_clip_the_model_cannot_code_is_named_before_the_data_is_read(tmp_path, modality, over, named):
    with pytest.raises(ValueError, match=named):  # a missing data folder would be the error after that
        Trainer(config(modality, tmp_path, 1, **{**over, "data.train": str(tmp_path / "absent")}))


def test_the_time_spent_writing_samples_is_said_and_left_out_of_the_rates(tmp_path, monkeypatch, capsys):
    import time  # noqa: PLC0415

    from tokenizers_vq.cli import main  # noqa: PLC0415

    write = samples.write
    monkeypatch.setattr(samples, "write", lambda *a, **k: (time.sleep(1.5), write(*a, **k)))  # a slow sample pass
    out = tmp_path / "run"
    cfg = config("image", out, 2, sample_every=1)
    args = [f"--{k}={v}" for k, v in {"model.modality": "image", "steps": 2, "sample_every": 1, "log_every": 1,
                                      "out_dir": out, "data.train": cfg.data.train, "data.crop": 32, "data.max_items": 4,
                                      "batch_size": 2, "mixed_precision": "no", "model.backbone.channels": 8}.items()]
    assert main(["train", "train/configs/image.yaml", *args, "--data.val="]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["sample_seconds"] >= 3.0  # two passes
    assert summary["steps_per_s"] * (summary["seconds"] - summary["sample_seconds"]) == pytest.approx(2, rel=1e-6)
    said = capsys.readouterr()
    assert "step 1: writing samples of whole files to" in said.err
    assert f"s of it writing samples); checkpoint: {out}/checkpoint/model" in said.out


def test_a_crop_range_whose_largest_crop_outgrows_a_step_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match=r"data.crop_max=64: a 64x64 crop holds 2x the pixels of a step of 2 crops of 32x32"):
        Trainer(config("image", tmp_path, 1, **{"data.crop_max": 64}))


def test_a_run_with_a_crop_range_trains_on_several_sizes(tmp_path, monkeypatch):
    tr = Trainer(config("video", tmp_path, 3, **{"data.crop_max": 64, "batch_size": 4}))
    shapes = []
    batch = tr.train_data.batch
    monkeypatch.setattr(tr.train_data, "batch", lambda *a, **k: shapes.append((x := batch(*a, **k)).shape) or x)
    summary = tr.train()
    assert summary["items_per_s"] / summary["steps_per_s"] == pytest.approx(sum(s[0] for s in shapes) / 3)  # trained
    assert all(32 <= s[-1] <= 64 and 32 <= s[-2] <= 64 and s[0] == max(1, round(4 * 32 * 32 / (s[-1] * s[-2])))
               for s in shapes)
    assert len({s[-2:] for s in shapes}) > 1 and tr.step == 3


@pytest.mark.parametrize("modality,over,named", [
    ("image", {"data.crop": 1024}, r"4 of 4 training items are smaller than the crop \(data.crop\)"),
    ("audio", {"data.segment_seconds": 60.0}, r"training items are smaller than the crop \(data.segment_seconds\)"),
])
def test_crops_larger_than_most_items_are_warned_about(tmp_path, modality, over, named):
    with pytest.warns(UserWarning, match=named):
        Trainer(config(modality, tmp_path, 1, **over))


def test_numbers_in_settings_read_as_written():
    """YAML 1.2's numbers: no octal from a leading zero, no base 60 from a colon, exponents without a dot."""
    cfg = load_config("train/configs/image.yaml", ["--data.train=photos", "--steps=010", "--save_every=0500",
                                                   "--optim.lr=1e-4", "--log_every=1_000"])
    assert (cfg.steps, cfg.save_every, cfg.optim.lr, cfg.log_every) == (10, 500, 1e-4, 1000)
    with pytest.raises(ValueError, match="max_minutes"):
        load_config("train/configs/image.yaml", ["--data.train=photos", "--max_minutes=7:30"])
    for bad in ("--data.segment_seconds=.inf", "--optim.lr=.inf", "--loss.l1=-.inf"):
        with pytest.raises(ValueError, match=f"{bad[2:].split('=')[0]}=-?inf: expected a finite number"):
            load_config("train/configs/image.yaml", ["--data.train=photos", bad])


def test_ctrl_c_saves_the_step_it_interrupts_and_the_run_resumes_from_it(tmp_path, monkeypatch):
    """A Ctrl-C part-way through a step lets the step finish, saves it and stops (not every
    step since the last save, 2000 in the shipped configs); the same run resumes from it and
    ends where an uninterrupted run does."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from tokenizers_vq.train.checkpoint import Interrupted  # noqa: PLC0415

    straight = Trainer(config("image", tmp_path / "a", 5))
    straight.train()
    run = Trainer(config("image", tmp_path / "b", 5))
    real, calls = run.generator_step, []

    def ctrl_c_in_step_3(x):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(x)

    monkeypatch.setattr(run, "generator_step", ctrl_c_in_step_3)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's (a background job ignores it)
    try:
        with pytest.raises(Interrupted, match=r"saved at step 3 in .*checkpoint"):
            run.train()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # where it is ignored, it stays ignored: the run goes on
        ignoring = Trainer(config("image", tmp_path / "ignored", 2))
        own = ignoring.generator_step
        monkeypatch.setattr(ignoring, "generator_step", lambda x: (os.kill(os.getpid(), signal.SIGINT), own(x))[1])
        ignoring.train()
        assert ignoring.step == 2 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)
    resumed = Trainer(config("image", tmp_path / "b", 5))
    assert resumed.step == 3
    resumed.train()
    a, b = (Tokenizer.from_pretrained(tmp_path / d / "checkpoint" / "model").state_dict() for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = Trainer(config("image", tmp_path / "c", 2))  # in the last step: the run ends as it would
    real, calls = last.generator_step, []
    monkeypatch.setattr(last, "generator_step", lambda x: (calls.append(1), len(calls) == 2 and os.kill(
        os.getpid(), signal.SIGINT), real(x))[-1])
    assert last.train()["steps"] == 2 and (tmp_path / "c" / "train_summary.json").is_file()


def test_a_run_names_what_it_leaves_out_and_counts_what_it_reads(tmp_path, capsys):
    """Files of a type the library does not read are named (as export and eval name them), and a
    validation folder inside the training folder is not trained on."""
    from testdata import small_photos  # noqa: PLC0415

    photos = small_photos(tmp_path / "data", 3, side=48)
    (tmp_path / "data" / "phone.heic").write_bytes(b"\0" * 64)
    (tmp_path / "data" / "talk.wav").write_bytes((tmp_path / "data" / "phone.heic").read_bytes())  # another kind
    val = small_photos(tmp_path / "data" / "val", 1, side=48)
    run = Trainer(config("image", tmp_path / "run", 1, **{"data.train": str(tmp_path / "data"),
                                                          "data.val": str(tmp_path / "data" / "val")}))
    err = capsys.readouterr().err
    assert "phone.heic" in err and "(.heic), left out" in err
    assert "also holds 1 audio file, left out: this run takes its image files; train with tvq train audio for those" in err
    assert "data: 3 training files, 1 held apart\n" in err
    assert sorted(run.train_data.files) == sorted(photos) and run.val_files == val
    Trainer(config("image", tmp_path / "run2", 1, **{"data.train": str(tmp_path / "data"), "data.val_fraction": 0.5,
                                                     "data.val": str(tmp_path / "data" / "val")}))
    assert "1 held apart (data.val names them; data.val_fraction=0.5 is not used)" in capsys.readouterr().err


def test_with_gradient_accumulation_the_log_is_the_mean_of_the_micro_batches(tmp_path, monkeypatch):
    run = Trainer(config("image", tmp_path / "run", 2, grad_accum=2))
    real, seen = run.generator_step, []

    def recorded(x):
        rec, logs = real(x)
        seen.append(float(logs["loss/total"]))
        return rec, logs

    monkeypatch.setattr(run, "generator_step", recorded)
    run.train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == 4 and seen[0] != seen[1]  # two micro-batches a step, of other items
    for line, pair in zip(lines, (seen[:2], seen[2:])):
        assert line["loss/total"] == pytest.approx(sum(pair) / 2, rel=1e-6)  # not the last micro-batch's alone


def test_a_crop_under_what_lpips_takes_is_named_before_the_data_is_read(tmp_path):
    from tokenizers_vq.train.losses import LPIPS  # noqa: PLC0415

    net = LPIPS("alex", random_backbone=True)
    side = net.min_side()
    assert side > 16
    with pytest.raises(ValueError, match=rf"data.crop=16: LPIPS \(loss.perceptual\) takes crops of at least {side} pixels"):
        Trainer(config("image", tmp_path, 1, **{"data.crop": 16, "loss.perceptual": 1.0,
                                               "data.train": str(tmp_path / "absent")}), lpips_module=net)


def test_a_discriminator_gone_non_finite_stops_the_run_before_it_saves(tmp_path):
    out = tmp_path / "run"
    Trainer(config("image", out, 2, save_every=2, **{"loss.adversarial": 0.1, "loss.disc_start": 0})).train()
    good = (out / "checkpoint" / "state.json").read_text()
    run = Trainer(config("image", out, 4, save_every=1, **{"loss.adversarial": 0.1, "loss.disc_start": 0}))
    step = run.discriminator_step

    def poisoned(x, rec):  # the discriminator's update goes bad after the generator's loss of the step was finite
        part = step(x, rec)
        with torch.no_grad():
            next(run.acc.unwrap_model(run.disc).parameters()).view(-1)[0] = float("nan")
        return part

    run.discriminator_step = poisoned
    with pytest.raises(FloatingPointError, match="loss or weights became NaN or Inf by step 3"):
        run.train()
    assert (out / "checkpoint" / "state.json").read_text() == good


def test_weight_decay_applies_to_the_discriminator_too(tmp_path):
    over = {"loss.adversarial": 0.1, "optim.weight_decay": 0.3}
    run = Trainer(config("image", tmp_path / "run", 1, save_every=1, **over))
    assert [g["weight_decay"] for g in run.opt_d.param_groups] == [0.3]
    run.train()
    resumed = Trainer(config("image", tmp_path / "run", 2, **{**over, "optim.weight_decay": 0.0}))
    assert [g["weight_decay"] for g in resumed.opt_d.param_groups] == [0.0]


def test_a_resume_that_writes_out_a_default_setting_is_the_same_model(tmp_path):
    out = tmp_path / "run"
    Trainer(config("image", out, 1, save_every=1)).train()
    backbone = json.dumps({**TINY["image"], "in_channels": 3})
    options = '{"codebook_size": 64, "kmeans_init": true, "kmeans_iters": 10}'
    resumed = Trainer(config("image", out, 2, **{"model.backbone": backbone, "model.quantizer.options": options}))
    assert resumed.step == 1
    scales = {"model.quantizer.kind": "multiscale", "model.quantizer.options": '{"codebook_size": 64}'}
    Trainer(config("image", tmp_path / "ms", 1, save_every=1, **scales)).train()
    written = '{"codebook_size": 64, "scales": [1, 2, 3, 4, 6, 8, 10, 13, 16]}'  # the default (a tuple) as a list
    assert Trainer(config("image", tmp_path / "ms", 2, **{**scales, "model.quantizer.options": written})).step == 1
    with pytest.raises(ValueError, match=r"another model config \(model.backbone.in_channels: 3 -> 1\)"):
        Trainer(config("image", out, 2, **{"model.backbone": backbone.replace('"in_channels": 3', '"in_channels": 1')}))


def test_a_damaged_summary_of_a_finished_run_is_not_an_error(tmp_path):
    out = tmp_path / "run"
    Trainer(config("image", out, 1, save_every=1)).train()
    (out / "train_summary.json").write_text('{"steps": 1, "sec')
    again = Trainer(config("image", out, 1)).train()
    assert again["already_trained"] and again["steps"] == 1
