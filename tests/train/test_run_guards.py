"""What a training run refuses before it works, and what it never loses: settings it cannot
train with or would ignore are named at load; an incomplete checkpoint is not taken for none;
a finished run run again keeps its record; a resumed run takes this run's optimiser settings."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_cli_guards import one_error_line
from trainrun import config

from tokenizers_vq.cli import main
from tokenizers_vq.train import checkpoint
from tokenizers_vq.train.config import load_config
from tokenizers_vq.train.trainer import Trainer


@pytest.mark.parametrize("override,named", [
    ("save_every=0", "save_every=0: expected a whole number >= 1"),
    ("log_every=0", "log_every=0"),
    ("grad_accum=0", "grad_accum=0"),
    ("steps=0", "steps=0"),
    ("data.val_fraction=1.0", r"data.val_fraction=1.0: expected a finite number in \[0, 1\)"),
    ("data.val_fraction=-0.5", "data.val_fraction=-0.5"),
    ("data.max_items=-1", "data.max_items=-1"),
    ("data.crop=0", "data.crop=0"),
    ("data.crop_max=64", r"data.crop_max=64: it is below data.crop=128; set --data.crop_max=0"),
    ("data.segment_seconds=0", "data.segment_seconds=0"),
    ("loss.l1=0 loss.l2=0 loss.perceptual=0", "every reconstruction weight .* is 0"),
    ("loss.mel=5", "loss.mel does not apply to an image model"),
    ("optim.betas=0.5", r"optim.betas=0.5: expected two numbers in \[0, 1\)"),
    ("optim.betas=[a,b]", "optim.betas="),
    ("optim.betas=[0.5,0.9,0.1]", "optim.betas="),
    ("mixed_precision=fp16", "mixed_precision='fp16' needs a CUDA GPU"),
    ("model=foo", "model must be a section of keys"),
    ("model.quantizer=vq", "model.quantizer must be a section of keys"),
    ("model.quantizer.options=3", "model.quantizer.options must be a section of keys"),
    ("model.quantizer.dynamic=3", "model.quantizer.dynamic must be a section of keys"),
    ("model.quantizer.options=", r"quantizer kind 'vq' needs the options \['codebook_size'\]"),
    ("seed=null", "seed is empty: it takes an integer"),
    ("out_dir=", "out_dir is empty: it takes a string"),
    ("model.quantizer.kind=fsq model.quantizer.options={}", r"quantizer kind 'fsq' needs the options \['levels'\]"),
    ("model.name=true", "the model's name must be a non-empty string"),
    ("step=2", "unknown config keys in config: \\['step'\\]; step: did you mean steps\\?"),
    ("data.trian=x", "data.trian: did you mean data.train\\?"),
    ("disc_start=1", "unknown config keys in config: \\['disc_start'\\]; disc_start: did you mean loss.disc_start\\?"),
])
def test_a_setting_a_run_cannot_train_with_is_named_at_load(override, named):
    if override.startswith("mixed_precision") and torch.cuda.is_available():
        pytest.skip("fp16 runs on a CUDA GPU")
    with pytest.raises(ValueError, match=named):
        load_config("train/configs/image.yaml", [*override.split(), "data.train=photos"])


def test_settings_of_the_wrong_kind_or_modality_are_refused_in_one_line(tmp_path, capsys):
    cmd = ["train", "train/configs/audio.yaml", f"--out_dir={tmp_path / 'a'}", "--steps=1", "--mixed_precision=no"]
    for extra, named in ((["--loss.perceptual=1"], "loss.perceptual does not apply to an audio model"),
                         (["--model.backbone.strides=4"], "backbone.strides must be a list"),
                         (["--data.crop_max=256"], "data.crop_max=256: audio trains on segments"),
                         (["--data.train="], "data.train is not set")):
        assert main([*cmd, *extra]) == 2
        assert named in one_error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["train", "train/configs/image.yaml", f"--out_dir={tmp_path / 'file'}", "--data.train=photos"]) == 2
    assert "out_dir" in one_error_line(capsys) and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("module,package", [("yaml", "pyyaml"), ("accelerate", "accelerate")])
def test_training_without_its_extra_is_one_error_line_naming_the_install(module, package, tmp_path, monkeypatch, capsys):
    """``tvq train`` on an install without the train extra: exit code 2 and the install to run, not a
    traceback; no run folder is made."""
    monkeypatch.setitem(sys.modules, module, None)  # ``import`` of it raises ImportError
    out = tmp_path / "run"
    assert main(["train", "image", "--steps=1", "--data.train=photos", f"--out_dir={out}"]) == 2
    said = one_error_line(capsys)
    assert f"needs {package}: pip install {package}" in said and "pip install 'tokenizers_vq[train]'" in said
    assert not out.exists()


def test_an_installed_package_that_does_not_import_is_not_called_missing(tmp_path, monkeypatch):
    """A package whose own import fails (a module it needs is gone) is named as installed but broken,
    with the import's error, not as one to install."""
    from tokenizers_vq.errors import MissingDependency, optional_module  # noqa: PLC0415

    (tmp_path / "tvq_broken_pkg.py").write_text("import tvq_module_it_needs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependency, match=r"needs tvq_broken_pkg, which is installed but does not import "
                                                r"\(No module named 'tvq_module_it_needs'\); install what it lacks "
                                                r"\(pip install tvq_module_it_needs\) or reinstall it: "
                                                r"pip install --force-reinstall --no-deps tvq_broken_pkg$"):
        optional_module("tvq_broken_pkg", "training", "tvq_broken_pkg", "train")
    assert "tvq_broken_pkg" not in sys.modules


def test_an_incomplete_checkpoint_is_refused_and_a_finished_run_keeps_its_record(tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(config("image", out, 2, save_every=2)).train()
    ckpt = out / "checkpoint"
    model_bytes = (ckpt / "model" / "model.safetensors").read_bytes()
    summary = (out / "train_summary.json").read_text()
    log = (out / "metrics.jsonl").read_text()

    again = Trainer(config("image", out, 2, save_every=2)).train()  # run again: nothing to train
    assert again["already_trained"] and (out / "train_summary.json").read_text() == summary

    (ckpt / "state.safetensors").rename(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match=r"incomplete checkpoint .*state.safetensors missing.*move the folder away"):
        Trainer(config("image", out, 4, save_every=2))
    assert (ckpt / "model" / "model.safetensors").read_bytes() == model_bytes
    assert (out / "metrics.jsonl").read_text() == log  # nothing was started over
    (tmp_path / "state.safetensors").rename(ckpt / "state.safetensors")

    (out / ".checkpoint.killed").mkdir()  # a save killed part-way leaves its folder
    (out / ".checkpoint.killed" / "state.safetensors").write_bytes(b"x" * 1000)
    Trainer(config("image", out, 4, save_every=2)).train()
    assert not list(out.glob(".checkpoint.*"))

    log, summary = (out / "metrics.jsonl").read_text(), (out / "train_summary.json").read_text()
    ckpt.rename(tmp_path / "moved")  # as the refusal above advises: the next run starts over, the record stays
    capsys.readouterr()
    Trainer(config("image", out, 1, save_every=1)).train()
    assert "kept as metrics.jsonl.1, train_summary.json.1" in capsys.readouterr().err
    assert (out / "metrics.jsonl.1").read_text() == log and (out / "train_summary.json.1").read_text() == summary
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_resumed_run_takes_this_runs_learning_rate_and_refuses_state_it_lacks(tmp_path):
    out = tmp_path / "run"
    Trainer(config("image", out, 2, save_every=2, ema_decay=0)).train()
    with pytest.raises(ValueError, match=r"saved with ema_decay=0, so it holds no ema state.*--init_from"):
        Trainer(config("image", out, 4, save_every=2, ema_decay=0.9))
    with_ema = tmp_path / "with_ema"  # and the other way: state the resumed run would drop from its checkpoint
    Trainer(config("image", with_ema, 2, save_every=2, ema_decay=0.9)).train()
    with pytest.raises(ValueError, match=r"holds ema state, which this run \(ema_decay=0\) would drop at its next save"):
        Trainer(config("image", with_ema, 4, save_every=2, ema_decay=0))
    same = Trainer(config("image", out, 4, save_every=2, ema_decay=0))
    slower = Trainer(config("image", out, 4, save_every=2, ema_decay=0, **{"optim.lr": 1e-5, "optim.betas": "[0.8,0.95]"}))
    assert same.opt_g.param_groups[0]["lr"] == pytest.approx(3e-3)
    group = slower.opt_g.param_groups[0]
    assert group["lr"] == pytest.approx(1e-5) and group["betas"] == (0.8, 0.95) and slower.sched.base_lrs == [1e-5]
    slower.train()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_a_checkpoint_that_cannot_be_written_is_an_os_error_and_the_last_one_stays(tmp_path, monkeypatch):
    from safetensors import SafetensorError  # noqa: PLC0415

    out = tmp_path / "run"
    trainer = Trainer(config("image", out, 2, save_every=1))
    trainer.train()
    before = (out / "checkpoint" / "state.json").read_text()

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="cannot write the checkpoint .*No space left.* the last one is kept"):
        checkpoint.save_checkpoint(out / "checkpoint", {"x": {"t": torch.zeros(2)}}, {"step": 3}, lambda p: None)
    assert (out / "checkpoint" / "state.json").read_text() == before and not list(out.glob(".checkpoint.*"))
    with pytest.raises(OSError, match="no earlier one exists"):
        checkpoint.save_checkpoint(tmp_path / "new" / "checkpoint", {"x": {"t": torch.zeros(2)}}, {"step": 1}, lambda p: None)
    monkeypatch.undo()

    def full_model_disk(path):  # the state written, the release model not: named the same way
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write the checkpoint in {out} .*No space left.* the last one is kept"):
        checkpoint.save_checkpoint(out / "checkpoint", {"x": {"t": torch.zeros(2)}}, {"step": 3}, full_model_disk)
    assert (out / "checkpoint" / "state.json").read_text() == before and not list(out.glob(".checkpoint.*"))


def test_a_checkpoint_is_readable_as_the_umask_says(tmp_path):
    """Not private to its writer: another user of a shared machine can resume or warm-start from it."""
    import os  # noqa: PLC0415
    import stat  # noqa: PLC0415

    umask = os.umask(0o022)
    try:
        folder = checkpoint.save_checkpoint(tmp_path / "checkpoint", {"x": {"t": torch.zeros(2)}}, {"step": 1},
                                            lambda p: p.mkdir())
    finally:
        os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "model").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()} == {0o644}


def test_audio_segments_shorter_than_the_spectral_windows_are_named_with_a_length_that_works(tmp_path):
    """The 2048-point spectral losses reflect-pad by 1024 samples: a shorter segment is refused
    before training, and the length the message advises trains."""
    import re  # noqa: PLC0415

    with pytest.raises(ValueError, match=r"data.segment_seconds=0.05: segments of \d+ samples .* at least "
                                         r"--data.segment_seconds=") as refused:
        Trainer(config("audio", tmp_path / "a", 1, **{"data.segment_seconds": 0.05, "data.max_items": 1}))
    least = float(re.search(r"segment_seconds=([0-9.]+)$", str(refused.value)).group(1))
    Trainer(config("audio", tmp_path / "b", 1, **{"data.segment_seconds": least, "data.max_items": 1}))


def test_text_settings_keep_words_that_yaml_1_1_read_as_booleans():
    cfg = load_config("train/configs/image.yaml", ["--out_dir=off", "--init_from=no", "--model.name=on",
                                                   "--data.train=photos", "--data.val="])
    assert (cfg.out_dir, cfg.init_from, cfg.model.name, cfg.data.val) == ("off", "no", "on", "")
    assert load_config("train/configs/image.yaml", ["--data.train=photos", "--cudnn_benchmark=true"]).cudnn_benchmark is True


def test_a_shipped_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: its train/configs/ is not here
    for name in ("image", "train/configs/audio.yaml", "video.yaml"):
        assert load_config(name, ["--data.train=photos"]).model.modality in ("image", "audio", "video")
    with pytest.raises(ValueError, match=r"config file not found: nope.yaml \(the shipped ones, by name: audio, image, video"):
        load_config("nope.yaml")


def test_paths_starting_with_a_tilde_are_the_home_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("train/configs/image.yaml", ["--out_dir=~/run", "--data.train=~/photos", "--init_from=~/model"])
    assert (cfg.out_dir, cfg.data.train, cfg.init_from) == tuple(str(tmp_path / p) for p in ("run", "photos", "model"))


def test_a_damaged_checkpoint_is_one_error_naming_it_and_the_ways_on(tmp_path):
    import shutil  # noqa: PLC0415

    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    done = tmp_path / "done"
    Trainer(config("image", done, 2, save_every=2)).train()
    state = json.loads((done / "checkpoint" / "state.json").read_text())
    tensors = load_file(done / "checkpoint" / "state.safetensors")
    weight = next(k for k in tensors if k.startswith("model.") and k.endswith("weight") and tensors[k].ndim == 4)
    moment = next(k for k in tensors if k.startswith("opt_g.") and tensors[k].ndim == 4)

    def edit_json(f): return lambda d: (d / "state.json").write_text(json.dumps(f(dict(state))))

    def edit_tensors(f): return lambda d: save_file(f(dict(tensors)), d / "state.safetensors")

    def reshaped(key): return edit_tensors(lambda t: {**t, key: t[key][..., :1].contiguous()})

    for name, damage in {
        "no_structure": edit_json(lambda s: {k: v for k, v in s.items() if k != "structure"}),
        "a_list": lambda d: (d / "state.json").write_text("[]"),
        "no_step": edit_json(lambda s: {k: v for k, v in s.items() if k != "step"}),
        "not_utf8": lambda d: (d / "state.json").write_bytes(b"\xff\xfe{}"),
        "a_tensor_missing": edit_tensors(lambda t: {k: v for k, v in t.items() if k != weight}),
        "a_weight_reshaped": reshaped(weight),
        "a_moment_reshaped": reshaped(moment),  # loaded by the optimiser, refused at its first step
    }.items():
        run = tmp_path / name
        shutil.copytree(done, run)
        damage(run / "checkpoint")
        with pytest.raises(ValueError, match=rf"corrupt checkpoint .*{name}/checkpoint .*checkpoint.old.*--init_from"):
            Trainer(config("image", run, 3, save_every=2)).train()
    with pytest.raises(torch.OutOfMemoryError):  # the device's trouble while restoring: not called a corrupt file
        with checkpoint.damaged(done / "checkpoint"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
