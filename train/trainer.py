"""One trainer for every modality: build -> ``accelerator.prepare`` -> a loop with a
named generator step and a named discriminator step.

Runs unchanged on CPU, one GPU, or several through ``accelerate launch``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tokenizers_vq import samples
from tokenizers_vq.distributed import all_reduce_sum_
from tokenizers_vq.errors import optional_module
from tokenizers_vq.media import left_out
from tokenizers_vq.modality import get as get_modality
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokenizer_config import filled_config
from tokenizers_vq.train.checkpoint import (Interrupted, changed_settings, check_run_folder, damaged, find_checkpoint,
                                            interrupt_at_step_end, load_checkpoint, optimizer_state, process_change, read_summary,
                                            rng_state, save_checkpoint, set_aside_earlier_run, set_rng_state, state_hashes,
                                            stop_if_nonfinite, truncate_log, write_summary)
from tokenizers_vq.train.config import TrainConfig, check_config, config_to_dict
from tokenizers_vq.train.data import (MediaFolder, check_grid, check_stills_apart, list_files, segment_samples,
                                      split_files, warn_undersized)
from tokenizers_vq.train.discriminators import build_discriminator
from tokenizers_vq.train.losses import (LPIPS, LeCam, adaptive_weight, feature_matching, hinge_d_loss, hinge_g_loss,
                                        reconstruction_terms)
from tokenizers_vq.train.run_files import RunFiles
from tokenizers_vq.train.warm_start import warm_start

TIME_CHECK_STEPS = 10
"""Steps between the ranks' comparisons of the time spent (``max_minutes``)."""


class Trainer:
    """Trains a :class:`Tokenizer` from a :class:`TrainConfig`; resumes from
    ``<out_dir>/checkpoint`` when one is there."""

    def __init__(self, cfg: TrainConfig, lpips_module: nn.Module | None = None):
        Accelerator = optional_module("accelerate", "training", "accelerate", "train").Accelerator  # noqa: N806

        check_config(cfg)
        self.cfg = cfg
        check_run_folder(Path(cfg.out_dir))
        # cpu=True on a machine without GPUs lets several launched processes form a gloo group
        self.acc = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available()
        )
        if cfg.cudnn_benchmark and torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # few crop shapes: cuDNN times each once
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = Tokenizer(cfg.model)
        if cfg.init_quantizer not in ("all", "first_level", "none"):
            raise ValueError(f"init_quantizer={cfg.init_quantizer!r}: expected 'all', 'first_level' or 'none'")
        if cfg.init_quantizer != "all" and not cfg.init_from and not (Path(cfg.out_dir) / "checkpoint").is_dir():
            raise ValueError(f"init_quantizer={cfg.init_quantizer!r} says what init_from gives the quantizer, "
                             "but no init_from is set: set init_from, or leave init_quantizer out")
        resuming = find_checkpoint(Path(cfg.out_dir) / "checkpoint") is not None
        if cfg.init_from and not resuming:  # a run that resumes has its own weights (init_from may be gone)
            warm_start(self.model, cfg.init_from, cfg.init_quantizer)
        if self.model.is_dynamic and cfg.sample_every > 0:
            raise ValueError("training samples are written for fixed-grid tokenizers only; set sample_every=0 "
                             "for a dynamic-length one")
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.ema_decay > 0 else None
        loss = cfg.loss
        self.disc = build_discriminator(cfg.model.modality) if loss.adversarial > 0 else None
        self.lecam = LeCam(loss.lecam_decay) if self.disc is not None and loss.lecam > 0 else None
        self.lpips = None
        if loss.perceptual > 0 and get_modality(cfg.model.modality).has_pixels:
            self.lpips = lpips_module or LPIPS(loss.lpips_net, loss.lpips_weights or None, loss.lpips_heads or None)
            self.lpips.to(self.acc.device)
        needs = {what: m.min_side() for what, m in (("the discriminator (loss.adversarial)", self.disc),
                                                    ("LPIPS (loss.perceptual)", self.lpips)) if hasattr(m, "min_side")}

        o = cfg.optim
        # the fused CUDA AdamW: one kernel for all parameters (it needs them on the GPU first)
        fused = self.acc.device.type == "cuda" or None
        self.model.to(self.acc.device)
        self.opt_g = torch.optim.AdamW(self.model.parameters(), o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda s: o.lr_factor(s, cfg.steps))
        self.model, self.opt_g = self.acc.prepare(self.model, self.opt_g)
        if self.disc is not None:
            self.disc.to(self.acc.device)
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), o.disc_lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)
            self.disc, self.opt_d = self.acc.prepare(self.disc, self.opt_d)
        if self.ema is not None:
            self.ema.to(self.acc.device)
        if self.lecam is not None:
            self.lecam.to(self.acc.device)

        d = cfg.data
        if not d.train:  # an empty path would list the working directory
            raise ValueError("data.train is not set: set --data.train=DIR, the folder of media to train on")
        sr = self.unwrapped.sample_rate
        crop = d.crop if sr else check_grid(self.unwrapped.backbone_config, d.crop, d.clip_frames, d.crop_max, cfg.batch_size, needs)
        files = list_files("data.train", d.train, cfg.model.modality, 0, cfg.out_dir)  # both capped once data.val is out
        val_files = list_files("data.val", d.val, cfg.model.modality, 0, cfg.out_dir) if d.val else None
        train_files, val_files = split_files(files, val_files, d.val_fraction, d.max_items)
        stills = list_files("data.stills", d.stills, "image", d.max_items, cfg.out_dir) if d.stills else None
        check_stills_apart(stills, val_files)
        self.train_data = MediaFolder(train_files, cfg.model.modality, sr, d.max_frames, stills, d.stills_fraction, d.max_pan)
        self.val_files, self.data_files = val_files, RunFiles(train_files, val_files, d.train, d.val or None)
        if self.acc.is_main_process:  # what the run leaves out of its folders, and what it reads
            for folder in dict.fromkeys(f for f in (d.train, d.val) if f):
                for note in left_out(folder, cfg.model.modality, {Path(cfg.out_dir) / "samples"}, "train with tvq train {kind}"):
                    tqdm.write(note, file=sys.stderr)
            unused = f" (data.val names them; data.val_fraction={d.val_fraction} is not used)" if d.val and d.val_fraction else ""
            tqdm.write(f"data: {len(train_files)} training files, {len(val_files)} held apart{unused}", file=sys.stderr)
        self.crop = segment_samples(d.segment_seconds, sr, self.unwrapped.backbone_config.hop) if sr else crop
        warn_undersized(self.train_data, self.crop if sr else d.crop, d.clip_frames,
                        "data.segment_seconds" if sr else "data.crop")
        self.out_dir = Path(cfg.out_dir)
        self.step, self.sample_seconds = 0, 0.0  # (the time write_samples took in this train(): see _rates)
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.acc.device)
        ckpt = find_checkpoint(self.out_dir / "checkpoint")
        if ckpt is not None:
            self._resume(ckpt)
        elif self.acc.is_main_process and (note := set_aside_earlier_run(self.out_dir)):  # nothing written is lost
            tqdm.write(note, file=sys.stderr)

    @property
    def unwrapped(self) -> Tokenizer:
        return self.acc.unwrap_model(self.model)

    # -- one optimisation step ------------------------------------------------------------
    def generator_step(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction (+ perceptual, spectral, quantizer, adversarial) terms, each
        times its named weight, summed once; backward; returns the reconstruction."""
        cfg, w = self.cfg, self.cfg.loss
        out = self.model(x)
        rec = out.reconstruction
        weights = {"l1": w.l1, "l2": w.l2, "mel": w.mel, "stft": w.stft}
        unweighted = frozenset(k for k, v in weights.items() if v == 0)
        terms = reconstruction_terms(rec.float(), x.float(), cfg.model.modality, self.unwrapped.sample_rate, unweighted)
        if self.lpips is not None:
            frames = rec if rec.ndim == 4 else rec.transpose(1, 2).flatten(0, 1)
            target = x if x.ndim == 4 else x.transpose(1, 2).flatten(0, 1)
            terms["perceptual"], weights["perceptual"] = self.lpips(frames, target), w.perceptual
        if out.losses:
            terms["quantizer"], weights["quantizer"] = torch.stack(list(out.losses.values())).sum(), w.quantizer
        if self._gan_active():
            # the generator's terms must not train the discriminator: call the unwrapped
            # module with its weights frozen (no gradient reaches them, no DDP hooks fire)
            disc = self.acc.unwrap_model(self.disc).requires_grad_(False)
            fake_logits, fake_feats = disc(rec)
            g_adv = hinge_g_loss(fake_logits)
            scale = torch.ones((), device=x.device)
            if w.adaptive_weight:
                rec_loss = sum(weights[k] * terms[k] for k in ("l1", "l2", "mel", "stft", "perceptual") if k in terms)
                scale = adaptive_weight(rec_loss, g_adv, self.unwrapped.decoder.last_layer)
            terms["adversarial"], weights["adversarial"] = g_adv * scale, w.adversarial
            if w.feature_matching > 0:
                with torch.no_grad():
                    _, real_feats = disc(x)
                terms["feature_matching"], weights["feature_matching"] = feature_matching(real_feats, fake_feats), w.feature_matching
            disc.requires_grad_(True)
        total = sum(weights[k] * v for k, v in terms.items() if weights[k] != 0)
        self.acc.backward(total)
        if self.acc.sync_gradients and cfg.optim.grad_clip > 0:
            self.acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.opt_g.step()
        if self.acc.sync_gradients:  # the schedule counts optimiser steps, not micro-batches
            self.sched.step()
        self.opt_g.zero_grad(set_to_none=True)
        # tensors, not floats: a float() per term would wait for the GPU every step;
        # the loop converts them only on the steps it logs
        logs = {f"loss/{k}": v.detach() for k, v in terms.items()}
        logs.update({k: v.detach() if isinstance(v, Tensor) else v for k, v in out.metrics.items()})
        logs["loss/total"] = total.detach()
        return rec.detach(), logs

    def discriminator_step(self, x: Tensor, rec: Tensor) -> dict[str, Tensor]:
        """Hinge loss on real vs reconstructed (+ LeCam); only after ``disc_start``."""
        real_logits, _ = self.disc(x)
        fake_logits, _ = self.disc(rec)
        d_loss = hinge_d_loss(real_logits, fake_logits)
        logs = {"disc/hinge": d_loss.detach()}
        if self.lecam is not None:
            reg = self.lecam(real_logits, fake_logits)
            d_loss = d_loss + self.cfg.loss.lecam * reg
            logs["disc/lecam"] = reg.detach()
        self.acc.backward(d_loss)
        if self.acc.sync_gradients and self.cfg.optim.grad_clip > 0:
            self.acc.clip_grad_norm_(self.disc.parameters(), self.cfg.optim.grad_clip)
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        return logs

    def _gan_active(self) -> bool:
        return self.disc is not None and self.step >= self.cfg.loss.disc_start

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        live = self.unwrapped
        # warm-up: early on the average follows the live weights (decay (1+t)/(10+t))
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        params, buffers = list(self.ema.parameters()), list(self.ema.buffers())  # one multi-tensor call each
        if params:
            torch._foreach_lerp_(params, [p.detach() for p in live.parameters()], 1 - decay)
        if buffers:  # the foreach ops refuse empty lists (a latent quantizer has no buffers)
            torch._foreach_copy_(buffers, list(live.buffers()))  # codebook statistics are EMAs already

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        log_path = self.out_dir / "metrics.jsonl"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start, start_step, self.sample_seconds = time.time(), self.step, 0.0
        if start_step >= cfg.steps:  # a finished run run again: keep its summary
            summary = read_summary(self.out_dir, self.step)
            return {**summary, "steps": self.step, "already_trained": True}
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not self.acc.is_main_process)
        items = 0  # trained since start: a crop range (data.crop_max) varies the items a step
        with interrupt_at_step_end(self.acc.num_processes == 1) as interrupted:
            while self.step < cfg.steps:
                self.model.train()
                logs: dict[str, Any] = {}
                for micro in range(cfg.grad_accum):
                    x = self.train_data.batch(cfg.batch_size, self.crop, cfg.seed, self.step * cfg.grad_accum + micro,
                                              self.acc.process_index, cfg.data.clip_frames).to(self.acc.device)
                    items += x.shape[0] * self.acc.num_processes  # (this rank's count for each rank)
                    models = [self.model] + ([self.disc] if self.disc is not None else [])
                    with self.acc.accumulate(*models):
                        rec, part = self.generator_step(x)
                        if self._gan_active():
                            part.update(self.discriminator_step(x, rec))
                    logs = {k: logs.get(k, 0) + v / cfg.grad_accum for k, v in part.items()}  # the step's mean
                self._update_ema()
                if self.acc.scaler is None:  # (fp16: the loss scaler skips a step whose gradients overflow)
                    self._nonfinite |= ~torch.isfinite(logs["loss/total"])  # on the device: no wait for the GPU
                self.step += 1
                bar.update(1)
                elapsed = time.time() - start
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logs = {k: float(v) for k, v in logs.items()}
                    logs.update(step=self.step, **self._rates(elapsed, self.step - start_step, items))
                    bar.set_postfix(loss=f"{logs['loss/total']:.4f}")
                    if self.acc.is_main_process:  # strict JSON: a NaN or Inf term is logged as null
                        with log_path.open("a") as f:
                            f.write(json.dumps({k: v if math.isfinite(v) else None for k, v in logs.items()}) + "\n")
                    stop_if_nonfinite(self._nonfinite, self.acc.num_processes, self.step, self.out_dir / "checkpoint")
                out_of_time = cfg.max_minutes > 0 and self._out_of_time(elapsed, cfg.max_minutes * 60, start_step)
                stop = interrupted() and self.step < cfg.steps  # Ctrl-C in a step: save it whole, then stop
                if self.step % cfg.save_every == 0 or self.step == cfg.steps or out_of_time or stop:
                    self.save()  # before the samples: a failure there must not cost the steps since the last save
                if cfg.sample_every > 0 and (self.step % cfg.sample_every == 0 or self.step == cfg.steps or out_of_time):
                    self.write_samples()
                if stop:
                    raise Interrupted(f"training saved at step {self.step} in {self.out_dir / 'checkpoint'}; "
                                      "the same command resumes it")
                if out_of_time:
                    break
        bar.close()
        elapsed = time.time() - start
        summary = {"steps": self.step, "seconds": elapsed, "sample_seconds": self.sample_seconds,
                   "codebook_hashes": self.codebook_hashes(), **self._rates(elapsed, self.step - start_step, items),
                   "num_processes": self.acc.num_processes, "device": str(self.acc.device),
                   "peak_memory_mib": (torch.cuda.max_memory_allocated(self.acc.device) / 2**20
                                       if self.acc.device.type == "cuda" else None)}
        if self.acc.is_main_process:
            write_summary(self.out_dir, summary)
        return summary

    def _rates(self, elapsed: float, steps: int, items: int) -> dict[str, float]:
        """Steps and items per second of training: the time :meth:`write_samples` took left out."""
        training = max(elapsed - self.sample_seconds, 1e-9)
        return {"steps_per_s": steps / training, "items_per_s": items / training}

    def _out_of_time(self, elapsed: float, limit: float, start_step: int) -> bool:
        """Whether to stop for ``max_minutes`` after this step. One process stops at the
        first step past the limit. Ranks decide together, every ``TIME_CHECK_STEPS`` steps
        (one small all-reduce and a host sync there), and stop where the next check would
        fall past the limit: ranks that decided alone stopped a step apart, the first
        waiting in ``save`` while the others ran the next step's collectives."""
        if self.acc.num_processes == 1 or self.step % TIME_CHECK_STEPS:  # alone: every step; ranks: at a check
            return self.acc.num_processes == 1 and elapsed > limit
        mine = elapsed + TIME_CHECK_STEPS * elapsed / max(1, self.step - start_step) > limit  # the next check's time
        return bool(all_reduce_sum_(torch.tensor([float(mine)], device=self.acc.device)) > 0)

    def close(self) -> None:
        """After a finished :meth:`train`: wait for every rank, then tear the process
        group down. Without this, a gloo process can abort at interpreter exit
        ("terminate called without an active exception") while its peer is still in the
        last collective. Not for a failed run: a rank that raised would wait here for
        peers stuck in a collective until the group's timeout."""
        if self.acc.num_processes > 1:
            self.acc.wait_for_everyone()
        self.acc.end_training()

    def codebook_hashes(self) -> list[str]:
        """SHA-256 of the quantizer's state on every rank (equal when the codebooks are
        bitwise identical), gathered to all ranks."""
        return state_hashes(self.unwrapped.quantizer, self.acc.process_index, self.acc.num_processes)

    def release_model(self) -> Tokenizer:
        return self.ema if self.ema is not None else self.unwrapped

    def write_samples(self) -> None:
        """Pictures and sounds of a few files; a failure there is a warning, not the run's end."""
        if not self.acc.is_main_process:
            return
        t0, folder = time.time(), self.out_dir / "samples" / f"step_{self.step:07d}"
        tqdm.write(f"step {self.step}: writing samples of whole files to {folder}", file=sys.stderr)
        try:
            samples.write(self.release_model(), self.val_files or self.train_data.files, folder)
        except Exception as e:  # noqa: BLE001 (samples are for people to look at; training goes on)
            warnings.warn(f"samples of step {self.step} not written ({type(e).__name__}: {e}); training goes on",
                          stacklevel=2)
        self.sample_seconds += time.time() - t0

    # -- checkpoints ----------------------------------------------------------------------
    def save(self) -> None:
        nets = [self.unwrapped] + ([self.acc.unwrap_model(self.disc)] if self.disc is not None else [])
        state = [t for m in nets for t in m.state_dict().values() if t.is_floating_point()]  # weights and codebooks
        self._nonfinite |= ~torch.stack([t.isfinite().all() for t in state]).all()
        stop_if_nonfinite(self._nonfinite, self.acc.num_processes, self.step, self.out_dir / "checkpoint")
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return
        parts: dict[str, Any] = {
            "model": self.unwrapped.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "sched": self.sched.state_dict(),
            "rng": rng_state(),
        }
        if self.ema is not None:
            parts["ema"] = self.ema.state_dict()
        if self.disc is not None:
            parts["disc"] = self.acc.unwrap_model(self.disc).state_dict()
            parts["opt_d"] = self.opt_d.state_dict()
        if self.lecam is not None:
            parts["lecam"] = self.lecam.state_dict()
        if self.acc.scaler is not None:  # fp16: the loss scale it has found, not 65536 again on resume
            parts["scaler"] = self.acc.scaler.state_dict()
        meta = {"step": self.step, "config": config_to_dict(self.cfg), "files": self.data_files.record(), "processes": self.acc.num_processes}
        save_checkpoint(self.out_dir / "checkpoint", parts, meta, self.release_model().save_pretrained)

    def _resume(self, directory: Path) -> None:
        parts, meta = load_checkpoint(directory)
        saved, now = filled_config(type(self.cfg.model).from_dict(meta["config"]["model"])), filled_config(self.cfg.model)
        if saved != now:
            changed = changed_settings(saved, now, "model.")
            raise ValueError(f"checkpoint {directory} was trained with another model config ({'; '.join(changed[:4])}): "
                             f"resume with it as it was, or train in a new out_dir with --init_from {directory}")
        for name, on, setting in (("ema", self.ema, "ema_decay=0"), ("disc", self.disc, "loss.adversarial=0"),
                                  ("lecam", self.lecam, "loss.lecam=0")):
            if (on is not None) != (name in parts):  # state to resume that is missing, or that would be dropped
                what = (f"holds {name} state, which this run ({setting}) would drop at its next save: resume without "
                        f"{setting}" if on is None else f"was saved with {setting}, so it holds no {name} state: resume with {setting} as it was")
                raise ValueError(f"checkpoint {directory} {what}, or train in a new out_dir with --init_from {directory}")
        data_changed = self.data_files.resume_check(directory, meta.get("files"))
        with damaged(directory):  # state of other shapes or keys than this model's
            self.unwrapped.load_state_dict(parts["model"])
            self.opt_g.load_state_dict(optimizer_state(parts["opt_g"], self.opt_g))
            self.sched.load_state_dict(parts["sched"])
            for name, part in (("ema", self.ema), ("lecam", self.lecam)):
                if part is not None:
                    part.load_state_dict(parts[name])
            if self.disc is not None:
                self.acc.unwrap_model(self.disc).load_state_dict(parts["disc"])
                self.opt_d.load_state_dict(optimizer_state(parts["opt_d"], self.opt_d))
            if self.acc.scaler is not None and "scaler" in parts:
                self.acc.scaler.load_state_dict(parts["scaler"])
            set_rng_state(parts["rng"])
        self.step = int(meta["step"])
        changed = changed_settings(meta["config"], config_to_dict(self.cfg), defaults=config_to_dict(TrainConfig()))
        changed += process_change(meta, self.acc.num_processes, self.cfg.batch_size)
        unused = f"; init_from={self.cfg.init_from} is not used (a new out_dir starts from it)" if self.cfg.init_from else ""
        self.acc.print(f"resuming {directory} at step {self.step} of {self.cfg.steps}{unused}"
                       + (f"; settings changed since that checkpoint: {', '.join(changed)}" if changed else "")
                       + (f"; data changed since that checkpoint: {data_changed}" if data_changed else ""))
        self._apply_optim_settings()
        if self.acc.is_main_process:
            truncate_log(self.out_dir / "metrics.jsonl", self.step)

    def _apply_optim_settings(self) -> None:
        """This run's learning rates, betas and weight decay over those a resumed optimiser
        state brought back (the same values when the config is unchanged)."""
        o = self.cfg.optim
        self.sched.base_lrs = [o.lr for _ in self.sched.base_lrs]
        for group in self.opt_g.param_groups:  # one group: the optimiser is built with every parameter at once
            group.update(initial_lr=o.lr, lr=o.lr * o.lr_factor(self.sched.last_epoch, self.cfg.steps),
                         betas=tuple(o.betas), weight_decay=o.weight_decay)
        for group in self.opt_d.param_groups if self.disc is not None else []:
            group.update(lr=o.disc_lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
