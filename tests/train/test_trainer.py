"""The trainer on real media, on CPU: loss falls, samples are written, resume is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_tokenizer import TINY
from testdata import lpips_files, shared_path
from trainrun import config

from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.train.config import load_config
from tokenizers_vq.train.losses import LPIPS, reconstruction_terms
from tokenizers_vq.train.trainer import Trainer

def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def held_batch_loss(tr: Trainer) -> float:
    """Reconstruction loss (the config's weighted l1/l2/mel terms) on a fixed batch."""
    cfg = tr.cfg
    x = tr.train_data.batch(4, tr.crop, seed=12345, step=0, frames=cfg.data.clip_frames)
    model = tr.unwrapped.eval()
    terms = reconstruction_terms(model(x).reconstruction, x, cfg.model.modality, model.sample_rate)
    weights = {"l1": cfg.loss.l1, "l2": cfg.loss.l2, "mel": cfg.loss.mel, "stft": cfg.loss.stft}
    return float(sum(weights[k] * v for k, v in terms.items()))


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_a_few_cpu_steps_on_real_media_lower_the_loss(modality, tmp_path):
    if modality == "video":
        pytest.importorskip("av", reason="PyAV is needed for video files")
    steps = 40
    over = {"data.max_items": 2}
    if modality == "audio":  # a little wider than the tiny test model, and longer at a gentle rate: at
        # lr 1e-2 and 40 steps the loss ratio hangs on 1e-6 differences in the encoder's numerics
        # (0.31 to 1.19; 0.90 with AVX2 kernels); at 2e-3 and 300 steps it stays at 0.23-0.65
        # across layouts, thread counts and AVX2 / AVX-512
        steps = 300
        over["optim.lr"] = 2e-3
        over["model.backbone"] = json.dumps({**TINY["audio"], "channels": 8, "latent_dim": 16, "decoder_dim": 32})
    tr = Trainer(config(modality, tmp_path, steps, **over))
    before = held_batch_loss(tr)
    summary = tr.train()
    after = held_batch_loss(tr)
    print(f"{modality}: held-batch reconstruction loss {before:.4f} -> {after:.4f}")
    assert summary["steps"] == steps and len(read_log(tmp_path)) == steps
    assert after < 0.85 * before
    model = Tokenizer.from_pretrained(tmp_path / "checkpoint" / "model")
    assert model.modality == modality
    samples = sorted((tmp_path / "samples").glob("step_*/*"))
    names = {p.name for p in samples}
    assert "codebook_usage.png" in names
    assert ("0_spectrogram.png" in names and "0_reconstruction.wav" in names) if modality == "audio" else "reconstructions.png" in names


def test_resume_continues_the_run_exactly(tmp_path):
    """6 steps straight vs 3 steps, a new process-like Trainer, 3 more: same weights,
    with the discriminator, LeCam, EMA and dead-code restarts all in play."""
    over = {"loss.adversarial": 0.1, "loss.disc_start": 2, "loss.lecam": 0.01, "loss.feature_matching": 1.0,
            "model.quantizer.options": '{"codebook_size": 64, "kmeans_init": true, "dead_code_threshold": 0.5}'}
    straight = Trainer(config("image", tmp_path / "a", 6, **over))
    straight.train()
    first = Trainer(config("image", tmp_path / "b", 6, **over, save_every=3, max_minutes=0))
    first.cfg.steps = 3
    first.train()
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # a killed run had logged steps 4-5, the last cut
        f.write('{"step": 4, "loss/total": 9.0}\n{"step": 5, "loss/to')
    resumed = Trainer(config("image", tmp_path / "b", 6, **over))
    assert resumed.step == 3
    resumed.train()
    a = load_file(tmp_path / "a" / "checkpoint" / "state.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "state.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k]) and not k.startswith("rng")]
    assert differ == []
    assert any(k.startswith("disc.") for k in a) and any(k.startswith("opt_d.") for k in a)
    assert read_log(tmp_path / "a")[-1]["loss/total"] == read_log(tmp_path / "b")[-1]["loss/total"]
    assert [line["step"] for line in read_log(tmp_path / "b")] == list(range(1, 7))  # one line per step


def test_init_from_continues_from_a_released_model(tmp_path):
    """A second run warm-started from the first run's released fp16 model starts at the
    loss of those weights: its first logged loss equals the loss of the released model
    on the same batch, and the held batch scores the same before and after loading."""
    first = Trainer(config("audio", tmp_path / "a", 20, **{"data.max_items": 2}))
    first.train()
    release = tmp_path / "release"
    first.release_model().save_pretrained(release, dtype=torch.float16)
    warm = Trainer(config("audio", tmp_path / "b", 1, **{"data.max_items": 2, "init_from": str(release)}))
    src = Tokenizer.from_pretrained(release)
    assert held_batch_loss(warm) == held_batch_loss(type("T", (), {"cfg": warm.cfg, "unwrapped": src,
                                                                    "train_data": warm.train_data, "crop": warm.crop})())
    fresh = Trainer(config("audio", tmp_path / "c", 1, **{"data.max_items": 2}))
    assert held_batch_loss(fresh) > held_batch_loss(warm)
    # step 0 of the warm run: the logged training loss is the released weights' loss on that batch
    x = warm.train_data.batch(warm.cfg.batch_size, warm.crop, warm.cfg.seed, 0)
    with torch.no_grad():
        out = src.train()(x)
    terms = reconstruction_terms(out.reconstruction, x, "audio", src.sample_rate)
    expected = terms["l1"] + terms["mel"] + sum(out.losses.values())
    warm.train()
    assert read_log(tmp_path / "b")[0]["loss/total"] == pytest.approx(float(expected), rel=1e-5)
    # a different model config is refused, naming the field
    with pytest.raises(ValueError, match="differs from this run's \\(model.quantizer.options.codebook_size 32 here, 64 in init_from"):
        Trainer(config("audio", tmp_path / "d", 1, **{"init_from": str(release),
                                                       "model.quantizer.options": '{"codebook_size": 32}'}))
    assert load_config(None, ["--init_from", str(release), "--data.train=photos"]).init_from == str(release)
    # a causal run starts from the offline weights (only the padding differs)
    causal = Trainer(config("audio", tmp_path / "e", 1, **{"data.max_items": 2, "init_from": str(release),
                                                            "model.backbone": json.dumps({**TINY["audio"], "causal": True})}))
    assert causal.unwrapped.backbone_config.causal and not src.backbone_config.causal
    Trainer(config("audio", tmp_path / "f", 1, **{"data.max_items": 2, "init_from": str(release),
                                                   "model.chunk_context": 40}))  # how audio is chunked: no weights
    for mine, theirs in zip(causal.unwrapped.parameters(), src.parameters(), strict=True):
        assert torch.equal(mine, theirs.to(mine.dtype))


def test_init_from_grows_a_video_decoder(tmp_path):
    """A video run with more decoder blocks per level warm-starts from a shallower model:
    its reconstructions equal the source's at step 0, and it trains from there; any other
    change of shape (or a shallower decoder) is refused."""
    pytest.importorskip("av", reason="PyAV is needed for video files")
    first = Trainer(config("video", tmp_path / "a", 3, **{"data.max_items": 1}))
    first.train()
    release = tmp_path / "release"
    first.release_model().save_pretrained(release)
    src = Tokenizer.from_pretrained(release)
    deep = json.dumps({**TINY["video"], "decoder_res_blocks": 2})
    warm = Trainer(config("video", tmp_path / "b", 2, **{"data.max_items": 1, "init_from": str(release),
                                                          "model.backbone": deep}))
    assert sum(p.numel() for p in warm.unwrapped.decoder.parameters()) > sum(p.numel() for p in src.decoder.parameters())
    x = warm.train_data.batch(2, warm.crop, seed=3, step=0, frames=5)
    with torch.no_grad():
        torch.testing.assert_close(warm.unwrapped.eval()(x).reconstruction, src.eval()(x).reconstruction)
    warm.train()
    assert len(read_log(tmp_path / "b")) == 2
    added = [b.conv2.weight for b in warm.unwrapped.decoder.blocks if hasattr(b, "conv2")][1::2]
    assert all(w.any() for w in added)  # the blocks that started as the identity trained
    with pytest.raises(ValueError, match="differs from this run's \\(model.backbone.num_res_blocks 2 here, 1 in init_from"):
        Trainer(config("video", tmp_path / "c", 1, **{"data.max_items": 1, "init_from": str(release),
                                                       "model.backbone": json.dumps({**TINY["video"], "num_res_blocks": 2})}))
    deeper = Tokenizer.from_pretrained(tmp_path / "b" / "checkpoint" / "model")
    deeper.save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match="differs from this run's \\(model.backbone.decoder_res_blocks"):
        Trainer(config("video", tmp_path / "d", 1, **{"data.max_items": 1, "init_from": str(tmp_path / "deep")}))


def test_init_quantizer_puts_a_trained_codebook_under_a_residual_one(tmp_path):
    """``init_quantizer=first_level``: the source's single quantizer becomes level 0 of a
    4-level residual one and the new levels start at zero output, so the warm-started
    model reconstructs exactly as the source; ``none`` takes the encoder and decoder only."""
    q = '{"codebook_size": 64, "codebook_dim": 4, "kmeans_init": true}'
    first = Trainer(config("audio", tmp_path / "a", 12, **{"data.max_items": 2, "model.quantizer.options": q}))
    first.train()
    release = tmp_path / "release"
    first.release_model().save_pretrained(release)
    src = Tokenizer.from_pretrained(release)
    over = {"data.max_items": 2, "init_from": str(release), "model.quantizer.options": q, "model.quantizer.levels": 4}
    warm = Trainer(config("audio", tmp_path / "b", 1, **over, init_quantizer="first_level"))
    x = warm.train_data.batch(2, warm.crop, seed=7, step=0)
    with torch.no_grad():
        ref, out = src.eval()(x), warm.unwrapped.eval()(x)
    torch.testing.assert_close(out.reconstruction, ref.reconstruction)
    assert torch.equal(out.codes[..., 0], ref.codes)  # level 0 picks the source's codes
    assert out.codes.shape[-1] == 4
    fresh = Trainer(config("audio", tmp_path / "c", 1, **over, init_quantizer="none"))
    for mine, theirs in zip(fresh.unwrapped.decoder.parameters(), src.decoder.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(fresh.unwrapped.quantizer.levels[0].embed, src.quantizer.embed)
    with pytest.raises(ValueError, match="init_quantizer=first_level needs a single-level source"):
        Trainer(config("audio", tmp_path / "d", 1, **{**over, "model.quantizer.levels": 1}, init_quantizer="first_level"))
    with pytest.raises(ValueError, match="init_quantizer='both'"):
        Trainer(config("audio", tmp_path / "e", 1, **over, init_quantizer="both"))
    with pytest.raises(ValueError, match="init_quantizer=none takes the encoder"):
        Trainer(config("audio", tmp_path / "f", 1, **over))
    with pytest.raises(ValueError, match="but no init_from is set"):
        Trainer(config("audio", tmp_path / "g", 1, **{**over, "init_from": ""}, init_quantizer="none"))


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_generator_step_leaves_the_discriminator_untouched(modality, tmp_path):
    """The generator's adversarial and feature-matching terms must not put gradients on
    the discriminator (they would cancel its fake-side hinge loss and let its scores of
    reconstructions grow without bound, as a GPU audio run did before this test)."""
    over = {"loss.adversarial": 1.0, "loss.disc_start": 0, "loss.adaptive_weight": modality == "image",
            "loss.feature_matching": 1.0, "data.max_items": 2}
    tr = Trainer(config(modality, tmp_path / "run", 1, **over))
    x = tr.train_data.batch(2, tr.crop, seed=0, step=0, frames=tr.cfg.data.clip_frames)
    disc = tr.acc.unwrap_model(tr.disc)
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    rec, logs = tr.generator_step(x)
    assert logs["loss/adversarial"] != 0 and logs["loss/feature_matching"] > 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())
    assert all(torch.equal(before[k], v) for k, v in disc.state_dict().items())
    d_logs = tr.discriminator_step(x, rec)  # and the discriminator still trains
    assert d_logs["disc/hinge"] > 0
    assert any(not torch.equal(before[k], v) for k, v in disc.state_dict().items())


def test_lpips_term_trains_from_weight_files(tmp_path):
    """LPIPS from (random) torchvision and lpips-heads files given in the config: the
    term is logged, finite, and weighted into the total."""
    torch.manual_seed(0)
    backbone, heads = lpips_files(tmp_path / "weights", "alex")
    over = {"loss.perceptual": 0.5, "loss.lpips_net": "alex", "loss.lpips_weights": backbone,
            "loss.lpips_heads": heads, "data.max_items": 2}
    tr = Trainer(config("image", tmp_path / "run", 3, **over))
    assert isinstance(tr.lpips, LPIPS) and not any(p.requires_grad for p in tr.lpips.parameters())
    tr.train()
    log = read_log(tmp_path / "run")
    assert len(log) == 3 and all(math.isfinite(r["loss/perceptual"]) and r["loss/perceptual"] > 0 for r in log)
    weighted = log[0]["loss/l1"] + 0.5 * log[0]["loss/perceptual"] + log[0]["loss/quantizer"]
    assert log[0]["loss/total"] == pytest.approx(weighted, rel=1e-5)
    with pytest.raises(FileNotFoundError, match="loss.lpips_weights"):
        Trainer(config("image", tmp_path / "run2", 1, **{**over, "loss.lpips_weights": tmp_path / "none.pth"}))


def test_fixed_grid_tools_refuse_a_dynamic_tokenizer_up_front(tmp_path):
    from tokenizers_vq.eval.evaluate import evaluate  # noqa: PLC0415

    with pytest.raises(ValueError, match="sample_every=0"):
        Trainer(config("image", tmp_path / "run", 1, **{"model.quantizer.dynamic": "{}", "sample_every": 5}))
    tr = Trainer(config("image", tmp_path / "run", 1, **{"model.quantizer.dynamic": "{}", "sample_every": 0}))
    assert tr.unwrapped.is_dynamic
    with pytest.raises(ValueError, match="fixed-grid"):
        evaluate(tr.unwrapped, tr.train_data.files[:1])


def test_config_overrides_are_checked(tmp_path):
    cfg = load_config("train/configs/image.yaml", ["--steps=7", "optim.betas=[0.1, 0.2]", "mixed_precision=no"])
    assert cfg.steps == 7 and cfg.optim.betas == (0.1, 0.2) and cfg.mixed_precision == "no"
    assert cfg.model.quantizer.options["codebook_size"] == 1024
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["steps"])
    for asked in ("-h", "--help"):  # (after the config: tvq train image -h)
        with pytest.raises(ValueError, match=r"the help of tvq train comes before the config: tvq train -h"):
            load_config(None, [asked])
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match=r"unknown options \['codebok_size'\].*did you mean 'codebook_size'"):
        load_config("train/configs/image.yaml", ["model.quantizer.options.codebok_size=512"])
    # values of the wrong kind are named at once, not as a TypeError deep in the run
    for override, words in [("steps=abc", "steps must be an integer, got 'abc'"), ("steps=1.5", "steps must be an integer"),
                            ("steps=true", "steps must be an integer"), ("optim.lr=fast", "optim.lr must be a number"),
                            ("mixed_precision=3", "mixed_precision='3': expected 'no', 'bf16' or 'fp16'"),
                            ("optim.lr=nan", "optim.lr must be a number, got nan"),
                            ("seed=-1", r"seed=-1: expected a whole number in \[0, "), ("seed=18446744073709551616", "seed="),
                            ("seed=2305843009213693958", "seed=")]:  # 7 + 2^61 - 1: seed 7's batches
        with pytest.raises(ValueError, match=words):
            load_config(None, [override])
    # a text setting that YAML reads as a number is the text typed; in a file, the message says to quote it
    assert load_config(None, ["out_dir=2024", "--data.train", "0123", "data.val=1.50"]).data.train == "0123"
    assert load_config(None, ["out_dir=2024"]).out_dir == "2024" and load_config(None, ["data.val=1.50"]).data.val == "1.50"
    assert load_config(None, ["out_dir=2024-06-01", "data.train=2024-06-02 10:00"]).out_dir == "2024-06-01"  # not dates
    assert load_config(None, ["data.train=2024-06-02 10:00"]).data.train == "2024-06-02 10:00"
    assert load_config(None, ["model.name=2024-06-01"]).model.name == "2024-06-01"
    # text as typed where YAML would read a comment or a boolean
    assert load_config(None, ["out_dir=runs/exp #2"]).out_dir == "runs/exp #2"
    assert load_config(None, ["data.train=/data/My Photos #1"]).data.train == "/data/My Photos #1"
    assert load_config(None, ["out_dir=True", "data.val=False"]).out_dir == "True"
    (tmp_path / "numbers.yaml").write_text("out_dir: 2024\n")
    with pytest.raises(ValueError, match=r"out_dir must be a string, got 2024 \(YAML read it as int: quote it in the file, '2024'\)"):
        load_config(tmp_path / "numbers.yaml")
    assert load_config(None, ["optim.lr=1e-4", "optim.grad_clip=2"]).optim.lr == 1e-4  # YAML reads 1e-4 as a string
    assert isinstance(load_config(None, ["optim.grad_clip=2"]).optim.grad_clip, float)
    assert load_config(None, ["data.val=", "init_from="]).init_from == ""  # an empty value: none, as the default
    assert load_config(None, ["out_dir='2024'"]).out_dir == "2024"  # quoted as the message says
    with pytest.raises(ValueError, match=r"data.max_frames=4 reads fewer frames .*data.clip_frames=9"):
        load_config("train/configs/video.yaml", ["data.max_frames=4", "data.clip_frames=9"])  # 5 frozen frames a clip


def test_a_training_file_past_the_input_range_is_named_at_load(tmp_path):
    import numpy as np  # noqa: PLC0415
    import soundfile as sf  # noqa: PLC0415

    from tokenizers_vq.train.data import MediaFolder  # noqa: PLC0415

    loud = np.zeros(1600, np.float32)
    loud[5] = -9.0
    sf.write(tmp_path / "loud.wav", loud, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"loud\.wav: audio input values reach \[-9, 0\]"):
        MediaFolder([tmp_path / "loud.wav"], "audio", 16000)


@pytest.mark.parametrize("name", ["image", "audio", "video"])
def test_shipped_configs_build(name):
    cfg = load_config(f"train/configs/{name}.yaml")
    tok = Tokenizer(cfg.model)
    assert tok.modality == name


def test_a_quantizer_without_buffers_trains_with_the_weight_average(tmp_path):
    """The EMA of the weights copies buffers with one multi-tensor call, which refuses an
    empty list: a latent quantizer has no buffers and must still train."""
    over = {"model.quantizer.kind": "latent", "model.quantizer.options": '{"values_per_dim": 5}', "ema_decay": 0.9}
    tr = Trainer(config("image", tmp_path / "run", 2, **over))
    assert not [b for b in tr.ema.quantizer.buffers()]  # nothing of the quantizer to copy
    summary = tr.train()
    assert summary["steps"] == 2 and all(torch.isfinite(p).all() for p in tr.ema.parameters())


def test_a_checkpoint_saved_before_new_config_fields_still_resumes(tmp_path):
    over = {"save_every": 2}
    Trainer(config("image", tmp_path, 2, **over)).train()
    state = tmp_path / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    for key in ("shared_codebook", "beam_size"):
        del meta["config"]["model"]["quantizer"][key]
    state.write_text(json.dumps(meta))
    assert Trainer(config("image", tmp_path, 4, **over)).step == 2
    meta["config"]["model"]["quantizer"]["levels"] = 3
    state.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"another model config \(model.quantizer.levels: 3 -> 1\): .*--init_from"):
        Trainer(config("image", tmp_path, 4, **over))


def test_the_learning_rate_decays_to_zero_over_the_last_steps(tmp_path):
    """Warm-up, constant, then a cosine to zero over ``optim.decay_steps``: the optimiser's
    learning rate follows it step by step, and a run without decay keeps its rate."""
    o = load_config(None, ["optim.lr=0.01", "optim.warmup_steps=2", "optim.decay_steps=4"]).optim
    factors = [o.lr_factor(s, 10) for s in range(10)]
    assert factors[:6] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert factors[6:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert o.lr_factor(10, 10) == pytest.approx(0.0, abs=1e-12)  # the rate after the last step
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    seen = []
    tr = Trainer(config("image", tmp_path / "decay", 6, **{"optim.decay_steps": 3, "optim.warmup_steps": 0}))
    opt = getattr(tr.opt_g, "optimizer", tr.opt_g)  # under accelerate's wrapper
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    tr.train()
    assert seen == pytest.approx([3e-3 * tr.cfg.optim.lr_factor(s, 6) for s in range(6)])
    assert seen[3] == pytest.approx(3e-3) and seen[4] < seen[3] and seen[-1] < 0.3 * 3e-3
    assert tr.opt_g.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    flat = Trainer(config("image", tmp_path / "flat", 2))
    flat.train()
    assert flat.opt_g.param_groups[0]["lr"] == pytest.approx(3e-3)


def test_the_video_trainer_pans_the_configured_stills(tmp_path):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    stills = shared_path("images", "bsds500", "val")
    tr = Trainer(config("video", tmp_path, 2, **{"data.stills": str(stills), "data.stills_fraction": 1.0}))
    assert len(tr.train_data.stills) == 4  # data.max_items caps the photos too
    x = tr.train_data.batch(2, tr.crop, seed=0, step=0, frames=tr.cfg.data.clip_frames)
    assert x.shape == (2, 3, 5, 32, 32)
    tr.train()
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


def test_a_warm_started_run_resumes_from_its_checkpoint_once_its_source_is_gone(tmp_path):
    """A checkpoint in out_dir takes precedence over init_from, which resuming never reads."""
    import shutil  # noqa: PLC0415

    first = Trainer(config("image", tmp_path / "a", 2, **{"data.max_items": 2}))
    first.train()
    source = first.release_model().save_pretrained(tmp_path / "source")
    run = config("image", tmp_path / "b", 2, **{"data.max_items": 2, "init_from": str(source), "save_every": 2})
    Trainer(run).train()
    shutil.rmtree(source)
    longer = config("image", tmp_path / "b", 4, **{"data.max_items": 2, "init_from": str(source), "save_every": 2})
    resumed = Trainer(longer)
    assert resumed.step == 2
    resumed.train()
    assert [line["step"] for line in read_log(tmp_path / "b")] == [1, 2, 3, 4]


def test_ranks_stop_for_max_minutes_at_the_same_step_before_the_limit(monkeypatch):
    """Under several processes the stop is agreed every TIME_CHECK_STEPS steps, where the next
    check would fall past the limit: a rank whose own clock has not run out stops with the
    others, and none stops between the checks."""
    from types import SimpleNamespace  # noqa: PLC0415

    from tokenizers_vq.train import trainer  # noqa: PLC0415

    peer_out = [False]
    monkeypatch.setattr(trainer, "all_reduce_sum_", lambda t: t + float(peer_out[0]))  # the peer's flag added
    n = trainer.TIME_CHECK_STEPS

    def out(step, elapsed, world=2):  # one second a step, a limit of 100 s
        me = SimpleNamespace(step=step, acc=SimpleNamespace(num_processes=world, device=torch.device("cpu")))
        return Trainer._out_of_time(me, elapsed, 100.0, 0)

    assert out(3, 101, world=1) and not out(3, 99, world=1)  # alone: every step, its own clock
    assert not out(n + 1, 200)  # between checks nobody stops, out of time or not
    assert not out(8 * n, 8 * n) and out(9 * n, 9 * n + 1)  # 91 s + 10 more steps would pass 100 s
    peer_out[0] = True
    assert out(2 * n, 2 * n)  # the peer's clock ran out: this rank stops at the same step
