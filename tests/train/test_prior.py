"""The token prior's training windows: inside one latent frame for video, skipping items too
small for a window, and clear refusals of exports it cannot train on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tokenizer import tiny, tiny_dynamic
from testdata import shared_path, small_photos

from tokenizers_vq.export import TokenDataset, export_dataset
from tokenizers_vq.prior import PriorConfig
from tokenizers_vq.train.prior import PriorTrainConfig, _windows, train_prior


def config(tokens: Path, out: Path, window: int, steps: int = 2) -> PriorTrainConfig:
    return PriorTrainConfig(export_dir=str(tokens), out_dir=str(out), window=window, steps=steps, batch_size=4,
                            val_windows=4, prior=PriorConfig(n_layer=1, n_head=1, n_embd=16))


def test_a_video_export_trains_on_windows_inside_one_latent_frame(tmp_path):
    pytest.importorskip("av", reason="PyAV reads video")
    from tokenizers_vq.media import load_video, save_video  # noqa: PLC0415

    frames, fps = load_video(shared_path("video", "imageio_realshort.mp4"), max_frames=9)
    clips = []
    for i in range(3):
        clips.append(save_video(frames[:, :, 8 * i : 8 * i + 32, :32], tmp_path / f"clip{i}.mp4", fps))
    export_dataset(tiny("video"), clips, tmp_path / "tokens")
    ds = TokenDataset(tmp_path / "tokens")
    grid = tuple(ds.codes(0).shape)
    assert len(grid) == 3 and grid[0] > 1  # several latent frames, each a grid of cells

    windows = _windows(ds, [0], 2, 2, 16, torch.Generator().manual_seed(0))
    assert windows.shape == (16, 4)
    codes = ds.codes(0)
    every = {tuple(codes[t, r : r + 2, c : c + 2].reshape(-1).tolist())
             for t in range(grid[0]) for r in range(grid[1] - 1) for c in range(grid[2] - 1)}
    assert all(tuple(w.tolist()) in every for w in windows)  # 2 x 2 cells of one frame each

    _, summary = train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=2))
    assert summary["tokens_per_sequence"] == 4 and summary["val_nats_per_token"] > 0


def test_items_too_small_for_the_window_are_skipped_and_too_few_items_refused(tmp_path, capsys):
    tok = tiny("image")  # f4: a 24 x 24 photo is a 6 x 6 grid, a 12 x 12 one 3 x 3
    small_photos(tmp_path / "big", 3, side=24)
    small_photos(tmp_path / "small", 2, side=12)
    files = sorted((tmp_path / "big").iterdir()) + sorted((tmp_path / "small").iterdir())
    export_dataset(tok, files, tmp_path / "tokens")
    _, summary = train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=5))
    assert "skipping 2 of 5 items" in capsys.readouterr().err and summary["tokens_per_sequence"] == 25

    with pytest.raises(ValueError, match=r"at least 2 items .* 5 item\(s\), 0 large enough .*smaller --window"):
        train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=7))
    export_dataset(tok, files[:1], tmp_path / "one")
    with pytest.raises(ValueError, match=r"at least 2 items .* 1 item\(s\), 1 large enough"):
        train_prior(config(tmp_path / "one", tmp_path / "prior", window=2))


def test_a_dynamic_length_export_is_refused_by_the_prior(tmp_path):
    files = small_photos(tmp_path / "photos", 2, side=16)
    export_dataset(tiny_dynamic("image"), files, tmp_path / "tokens")
    with pytest.raises(ValueError, match="dynamic-length tokens .* export with a fixed-rate model"):
        train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=2))


def test_a_trained_prior_is_saved_and_loads_back_to_the_same_predictions(tmp_path):
    from tokenizers_vq.prior import TokenPrior  # noqa: PLC0415

    tok = tiny("image")
    export_dataset(tok, small_photos(tmp_path / "photos", 3, side=24), tmp_path / "tokens")
    prior, _ = train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=3, steps=3))
    again = TokenPrior.load(tmp_path / "prior")
    x = torch.randint(0, prior.cfg.vocab_size, (2, prior.cfg.block_size))
    assert again.cfg == prior.cfg
    torch.testing.assert_close(again(x)[0], prior.eval()(x)[0])
    with pytest.raises(ValueError, match="not a saved prior"):
        TokenPrior.load(tmp_path / "tokens")
    import shutil  # noqa: PLC0415

    shutil.copytree(tmp_path / "prior", tmp_path / "edited")
    cfg = json.loads((tmp_path / "edited" / "prior_config.json").read_text())
    (tmp_path / "edited" / "prior_config.json").write_text(json.dumps({**cfg, "n_layer": cfg["n_layer"] + 1}))
    with pytest.raises(ValueError, match=r"corrupt weights file .*prior.safetensors \(or not its config's\): .*Missing key"):
        TokenPrior.load(tmp_path / "edited")
    (tmp_path / "edited" / "prior_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt .*prior_config.json"):
        TokenPrior.load(tmp_path / "edited")
    (tmp_path / "prior" / "prior.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"corrupt weights file .*prior.safetensors"):
        TokenPrior.load(tmp_path / "prior")


def test_a_short_run_reaches_the_full_learning_rate(tmp_path, monkeypatch):
    """The warm-up takes a tenth of a short run (a fixed 100 steps would keep a 60-step run
    under 14% of the rate)."""
    lrs = []
    real = torch.optim.lr_scheduler.LambdaLR.step

    def step(self, *a):
        real(self, *a)
        lrs.append(self.get_last_lr()[0])

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)
    export_dataset(tiny("image"), small_photos(tmp_path / "photos", 3, side=24), tmp_path / "tokens")
    cfg = config(tmp_path / "tokens", tmp_path / "prior", window=3, steps=40)
    train_prior(cfg)
    assert max(lrs) > 0.9 * cfg.lr


def test_an_interrupted_prior_keeps_the_steps_done_and_an_unwritable_out_is_refused_first(tmp_path, monkeypatch):
    from tokenizers_vq.prior import TokenPrior  # noqa: PLC0415

    export_dataset(tiny("image"), small_photos(tmp_path / "photos", 3, side=24), tmp_path / "tokens")
    (tmp_path / "file").write_text("mine")
    trained, real_step, real_clip = [], torch.optim.AdamW.step, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: trained.append(1))
    with pytest.raises(ValueError, match="cannot write"):  # a file where the folder goes: before any step
        train_prior(config(tmp_path / "tokens", tmp_path / "file" / "prior", window=3, steps=5))
    assert not trained and (tmp_path / "file").read_text() == "mine"

    def step(self, *a, **k):  # the real step, and the weights after it
        out = real_step(self, *a, **k)
        trained.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
        return out

    def clip(*a, **k):  # a Ctrl-C in the fourth step, after three were done
        if len(trained) == 3:
            raise KeyboardInterrupt
        return real_clip(*a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with pytest.raises(KeyboardInterrupt, match=r"trained for 3 of 50 steps is saved in .*prior \(TokenPrior.load\)"):
        train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=3, steps=50))
    kept = TokenPrior.load(tmp_path / "prior")
    assert kept.cfg.block_size == 9 and len(trained) == 3
    assert all(torch.equal(a, b) for a, b in zip(kept.parameters(), trained[2], strict=True))  # the third step's
    assert not all(torch.equal(a, b) for a, b in zip(trained[1], trained[2]))
    assert json.loads((tmp_path / "prior" / "prior_summary.json").read_text())["steps"] == 3


def test_a_model_that_cannot_decode_the_export_is_refused_and_other_weights_warned_of(tmp_path):

    from tokenizers_vq.token_dataset import read_json  # noqa: PLC0415
    from tokenizers_vq.train.prior import check_model  # noqa: PLC0415

    tok = tiny("image")
    export_dataset(tok, small_photos(tmp_path / "photos", 3, side=24), tmp_path / "tokens")
    manifest = read_json(tmp_path / "tokens" / "manifest.json", "shards")
    assert check_model(tmp_path / "tokens", manifest, tok) is None
    with pytest.raises(ValueError, match=r"code shape \(2,\)\), but the model .*code shape \(\)\): pass --model"):
        check_model(tmp_path / "tokens", {**manifest, "code_shape": [2]}, tok)  # a residual model's tokens
    other = tiny("image")
    with torch.no_grad():
        next(other.decoder.parameters()).add_(1.0)  # same name and codebook, other weights
    assert "with other weights than" in check_model(tmp_path / "tokens", manifest, other)
    record = json.loads((tmp_path / "tokens" / "export.json").read_text())
    assert record["weights_sha256"]  # what the check compares with
    from tokenizers_vq.prior import TokenPrior  # noqa: PLC0415

    train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=3, steps=1))
    prior = TokenPrior.load(tmp_path / "prior")  # a saved prior knows whose tokens it learned
    assert (prior.cfg.tokens_of, prior.cfg.tokens_weights_sha256) == (tok.config.name, record["weights_sha256"])
    prior.check_tokenizer(tok)
    with pytest.raises(ValueError, match=r"this prior learned the tokens of model .* other weights, which decode its "
                                         r"samples as other content"):
        prior.check_tokenizer(other)


def test_a_trained_prior_samples_the_same_ids_from_the_same_generator_and_names_bad_inputs(tmp_path):
    import dataclasses  # noqa: PLC0415

    export_dataset(tiny("image"), small_photos(tmp_path / "photos", 3, side=24), tmp_path / "tokens")
    cfg = config(tmp_path / "tokens", tmp_path / "prior", window=3, steps=2)
    cfg = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, dropout=0.5))
    prior, _ = train_prior(cfg)
    assert not prior.training
    prior.train()  # left training by a caller: sampling is still without dropout, its mode kept
    draws = []
    for seed in (1, 2):  # torch's global seed is not the sampler's
        torch.manual_seed(seed)
        draws.append(prior.generate(torch.zeros(2, dtype=torch.long), 9, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(draws[0], draws[1]) and prior.training
    with pytest.raises(ValueError, match="labels must be \\(B,\\) class ids"):
        prior.generate(torch.zeros(2), 4)
    with pytest.raises(ValueError, match="tokens must be \\(B, L\\) integer ids"):
        prior(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="val_windows=0: each must be >= 1"):
        train_prior(dataclasses.replace(cfg, val_windows=0))


def test_a_second_prior_into_the_folder_of_a_first_is_refused_before_training(tmp_path):
    export_dataset(tiny("image"), small_photos(tmp_path / "photos", 3, side=24), tmp_path / "tokens")
    train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=3))
    first = (tmp_path / "prior" / "prior.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"prior holds a trained prior already: name another output folder \(--out\)"):
        train_prior(config(tmp_path / "tokens", tmp_path / "prior", window=2))
    assert (tmp_path / "prior" / "prior.safetensors").read_bytes() == first
