"""Codebooks stay bit-identical across ranks (2 gloo processes on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")
SHARDED_WORKER = Path(__file__).with_name("dist_sharded_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out_dir: Path, worker: Path = WORKER) -> None:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(worker), str(out_dir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out


def test_codebooks_are_bitwise_identical_on_two_ranks(tmp_path):
    launch(2, tmp_path)
    (tmp_path / "alone").mkdir()
    launch(1, tmp_path / "alone")  # rank 0's data without its peer
    for name in ("vq", "rvq", "vq-cosine-learned", "vq-affine"):
        r0 = load_file(tmp_path / f"{name}_rank0.safetensors")
        r1 = load_file(tmp_path / f"{name}_rank1.safetensors")
        alone = load_file(tmp_path / "alone" / f"{name}_rank0.safetensors")
        assert r0.keys() == r1.keys()
        for key in r0:  # raw bytes: bitwise, not just numerically, equal
            assert r0[key].numpy().tobytes() == r1[key].numpy().tobytes(), f"{name}.{key} differs between ranks"
        restarts = [v for k, v in r0.items() if k.endswith("restarts")]
        assert sum(int(v) for v in restarts) > 0, f"{name}: no dead-code restart happened"
        assert all(bool(v) for k, v in r0.items() if k.endswith("initted"))
        # the statistics really were shared: alone, rank 0 ends with other EMA counts
        sizes = [k for k in r0 if k.endswith("cluster_size")]
        assert all(not alone[k].equal(r0[k]) for k in sizes), f"{name}: same statistics without the peer"
    # a projected codebook self-initialised while the ranks held different numbers of rows:
    # both ranks reached the shared k-means (none waited alone) and hold the same codebook
    r0, r1 = (load_file(tmp_path / f"projected-uneven_rank{r}.safetensors") for r in (0, 1))
    assert bool(r0["initted"]) and bool(r1["initted"])
    assert all(r0[k].numpy().tobytes() == r1[k].numpy().tobytes() for k in r0 if k != "last_used")  # (usage: per rank)
    assert (tmp_path / "shrunk_rank0.safetensors").is_file()  # rank 0 alone shrank a codebook
    r0, r1 = (load_file(tmp_path / f"projected-features_rank{r}.safetensors") for r in (0, 1))
    assert r0["features"].numpy().tobytes() == r1["features"].numpy().tobytes()
    # the LeCam regulariser's averages of the discriminator's outputs: over both ranks' batches
    r0, r1 = (load_file(tmp_path / f"lecam_rank{r}.safetensors") for r in (0, 1))
    alone = load_file(tmp_path / "alone" / "lecam_rank0.safetensors")
    assert all(r0[k].numpy().tobytes() == r1[k].numpy().tobytes() for k in ("real_ema", "fake_ema"))
    assert not torch.equal(r0["real_ema"], alone["real_ema"])



def test_sharded_search_returns_the_unsharded_indices(tmp_path):
    launch(2, tmp_path, SHARDED_WORKER)
    for rank in range(2):
        r = load_file(tmp_path / f"sharded_rank{rank}.safetensors")
        for metric in ("l2", "cosine"):
            assert torch.equal(r[f"{metric}_sharded"], r[f"{metric}_reference"]), (rank, metric)
        assert int(r["l2_sharded"][0]) == 3  # exact tie between shards: the lower id


def test_sharded_vq_ema_equals_one_process_holding_the_whole_codebook(tmp_path):
    """2 ranks, each holding half of a 301-code EMA codebook, trained on different data
    with dead-code restarts, end with the codebook one process gets from both ranks' data."""
    import importlib.util  # noqa: PLC0415

    from tokenizers_vq.quantizers.sharded import ShardedVectorQuantizer  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("dist_sharded_worker", SHARDED_WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    launch(2, tmp_path, SHARDED_WORKER)
    ranks = [load_file(tmp_path / f"sharded_rank{r}.safetensors") for r in range(2)]
    whole = ShardedVectorQuantizer(8, 301, dead_code_threshold=0.95)
    for x0, x1 in zip(worker.batches(0), worker.batches(1)):
        codes = whole(torch.cat([x0, x1])).codes
    assert torch.equal(torch.cat([ranks[0]["train_codes"], ranks[1]["train_codes"]]), codes)
    torch.testing.assert_close(torch.cat([r["shard"] for r in ranks]), whole.embed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["cluster_size"] for r in ranks]), whole.cluster_size)
    assert ranks[0]["shard"].shape[0] == 151 and ranks[1]["shard"].shape[0] == 150
    assert int(whole.restarts) > 0 and sum(int(r["restarts"]) for r in ranks) == int(whole.restarts)
    for r in ranks:  # decode across shards returns the chosen codewords
        full = torch.cat([x["shard"] for x in ranks])
        assert torch.equal(r["probe_decoded"], full[r["probe_codes"]])


def test_trainer_under_accelerate_launch_keeps_codebooks_identical(tmp_path):
    """2 gloo processes through `accelerate launch`, a few steps on real photos."""
    from testdata import shared_path  # noqa: PLC0415

    photos = shared_path("images", "bsds500", "train")
    # this interpreter's accelerate, not whichever `accelerate` is first on PATH
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "tokenizers_vq.cli", "train",
           str(Path(__file__).parents[1] / "train" / "configs" / "image.yaml"), f"--data.train={photos}",
           "--data.max_items=6", "--data.val=", "--steps=4", "--batch_size=2", "--data.crop=32", "--loss.disc_start=2",
           "--sample_every=100", "--save_every=100", f"--out_dir={tmp_path}",
           '--model.backbone={"channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention": false, "latent_dim": 8}',
           '--model.quantizer.options={"codebook_size": 64, "kmeans_init": true, "dead_code_threshold": 0.5}']
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    hashes = json.loads((tmp_path / "codebook_hashes.json").read_text())
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert (tmp_path / "checkpoint" / "model" / "model.safetensors").is_file()
