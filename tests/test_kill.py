"""`tvq train` and `tvq export` killed with SIGKILL and run again: the result is bit for bit
the result of a run that was never interrupted.

Each test starts the command twice at once (two processes, one thread each): one runs
through; the other is killed (train: once after two logged steps, before any
checkpoint, and again as soon as its first checkpoint is on disk; export: as soon as its
first shard is), then started again with the same command line and left to finish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_tokenizer import TINY, tiny
from testdata import shared_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300  # seconds for any one process; a run takes a few


def tvq(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenizers_vq.cli", *args]


def kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fail if it ends first (nothing then
    tests the resume)."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit code {proc.returncode}) before {what} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {TIMEOUT} s")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]


def test_train_killed_before_and_after_its_first_checkpoint_resumes_to_the_same_weights(tmp_path):
    """Killed once before any checkpoint (the rerun starts over and must drop the lines
    the killed run logged) and once just after the first one (the rerun resumes)."""
    steps = 40
    cfg = {
        "model": {"modality": "image", "backbone": TINY["image"],
                  "quantizer": {"options": {"codebook_size": 64, "kmeans_init": True, "dead_code_threshold": 0.5}}},
        "data": {"train": str(shared_path("images", "bsds500", "train")), "max_items": 4, "crop": 48},
        "optim": {"lr": 3e-3},
        "steps": steps, "batch_size": 2, "log_every": 1, "sample_every": 0, "save_every": 8,
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = {d: tvq("train", str(config), f"out_dir={d}") for d in (whole, killed)}
    straight = subprocess.Popen(run[whole], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, state = killed / "metrics.jsonl", killed / "checkpoint" / "state.json"

    victim = subprocess.Popen(run[killed], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(victim, lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, "two logged steps")
    assert not state.exists(), "killed after the first checkpoint: save_every leaves too little time"
    victim = subprocess.Popen(run[killed], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(victim, state.is_file, "a checkpoint")
    cut_at = json.loads(state.read_text())["step"]
    assert cut_at < steps and not (killed / "train_summary.json").exists()
    finish(subprocess.Popen(run[killed], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    finish(straight)

    a = load_file(whole / "checkpoint" / "state.safetensors")
    b = load_file(killed / "checkpoint" / "state.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # rng states included
    for name in ("model.safetensors", "config.json"):
        assert (whole / "checkpoint" / "model" / name).read_bytes() == (killed / "checkpoint" / "model" / name).read_bytes()
    logs = {d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, killed)}
    assert [r["step"] for r in logs[killed]] == list(range(1, steps + 1)), f"killed at step {cut_at}"
    timing = {"steps_per_s", "items_per_s"}
    for x, y in zip(logs[whole], logs[killed]):
        assert {k: v for k, v in x.items() if k not in timing} == {k: v for k, v in y.items() if k not in timing}


def test_export_killed_after_its_first_shard_resumes_to_the_same_files(tmp_path):
    model = tiny("image").save_pretrained(tmp_path / "model")
    data = tmp_path / "photos"
    data.mkdir()
    for p in sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:12]:
        (data / p.name).write_bytes(p.read_bytes())
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = {d: tvq("export", "--model", str(model), "--device", "cpu", "--data", str(data), "--out", str(d),
                  "--shard-items", "2", "--batch-size", "1") for d in (whole, killed)}
    straight = subprocess.Popen(run[whole], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen(run[killed], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(victim, lambda: any(killed.glob("shard_*.json")), "a shard")
    assert not (killed / "manifest.json").exists()
    finish(subprocess.Popen(run[killed], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    finish(straight)

    def outputs(d: Path) -> dict[str, bytes]:
        """Shards (tokens, index, layout) and the manifest, by name."""
        return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith("shard_") or p.name == "manifest.json"}

    expected, got = outputs(whole), outputs(killed)
    assert len([n for n in expected if n.endswith(".bin")]) == 6
    assert sorted(got) == sorted(expected)
    assert [n for n in expected if got[n] != expected[n]] == []
