"""Codebooks stay bit-identical across ranks (2 gloo processes on CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out_dir: Path) -> None:
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out_dir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out


def test_codebooks_are_bitwise_identical_on_two_ranks(tmp_path):
    launch(2, tmp_path)
    (tmp_path / "alone").mkdir()
    launch(1, tmp_path / "alone")  # rank 0's data without its peer
    for name in ("vq", "rvq", "vq-cosine-learned"):
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

