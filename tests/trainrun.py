"""A tiny training run's config on real media, for the trainer's tests."""

from __future__ import annotations

import json

from test_tokenizer import TINY
from testdata import shared_path

from tokenizers_vq.train.config import TrainConfig, load_config

DATA = {
    "image": ("images", "bsds500", "train"),
    "audio": ("audio", "librispeech_train-clean-100"),
    "video": ("video",),
}


def config(modality: str, out_dir, steps: int, **over) -> TrainConfig:
    """A few steps of a tiny model on a few files of ``modality``'s real data; ``over``: more overrides."""
    overrides = {
        "model.modality": modality,
        "model.backbone": json.dumps(TINY[modality]),
        "model.quantizer.options": '{"codebook_size": 64, "kmeans_init": true}',
        "data.train": str(shared_path(*DATA[modality])),
        "data.max_items": 4,
        "data.crop": 32,
        "data.segment_seconds": 0.25,
        "data.clip_frames": 5,
        "data.max_frames": 12,
        "loss.mel": 1.0 if modality == "audio" else 0.0,
        "steps": steps,
        "batch_size": 2,
        "log_every": 1,
        "sample_every": 10_000,
        "save_every": 10_000,
        "out_dir": str(out_dir),
        "optim.lr": 3e-3,
        **over,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])
