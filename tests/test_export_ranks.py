"""``tvq export`` on several ranks (2 gloo processes on CPU, started as ``accelerate launch``
or ``torchrun`` start them): the same bytes as one process, resume per rank after a kill,
and one rank's failure stops the other with its error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_distributed import free_port
from test_tokenizer import tiny
from testdata import shared_path


def _setup(tmp_path: Path, n: int = 6) -> tuple[list[str], dict[str, str]]:
    model = tiny("image").save_pretrained(tmp_path / "model")
    data = tmp_path / "photos"
    data.mkdir()
    for p in sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:n]:
        (data / p.name).write_bytes(p.read_bytes())
    cmd = [sys.executable, "-m", "tokenizers_vq.cli", "export", "--model", str(model), "--device", "cpu",
           "--data", str(data), "--shard-items", "1", "--batch-size", "1", "--workers", "0"]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1"}


# ``tvq export`` whose ranks pause after each shard, so that the kill below lands mid-export
# (unpaused, a fast machine finished all six shards between two polls)
_SLOW_SHARDS = """
import runpy, time
import tokenizers_vq.export as export
write = export._write_shard
def paused(*args, **kwargs):
    write(*args, **kwargs)
    time.sleep(1.0)
export._write_shard = paused
runpy.run_module("tokenizers_vq.cli", run_name="__main__")
"""


def _ranks(cmd: list[str], env: dict[str, str], world: int = 2) -> list[subprocess.Popen]:
    port = str(free_port())
    return [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    outs = [p.communicate(timeout=240)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_two_ranks_write_one_process_export_and_resume_per_rank_after_a_kill(tmp_path):
    cmd, env = _setup(tmp_path)
    subprocess.run([*cmd, "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    results = _wait(_ranks([*cmd, "--out", str(tmp_path / "two")], env))
    assert all(rc == 0 for rc, _ in results), results
    assert "2 ranks: wrote 6 shards, 6 items" in results[0][1] and "wrote" not in results[1][1]
    one = _files(tmp_path / "one")
    assert _files(tmp_path / "two") == one  # byte for byte, export.json and manifest included

    killed = tmp_path / "killed"
    procs = _ranks([sys.executable, "-c", _SLOW_SHARDS, *cmd[3:], "--out", str(killed)], env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("shard_*.json"))) < 2:
        time.sleep(0.05)
    for p in procs:
        p.kill()
        p.wait()
    done = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard_*.json")}
    assert 2 <= len(done) < 6 and not (killed / "manifest.json").exists()
    results = _wait(_ranks([*cmd, "--out", str(killed)], env))
    assert all(rc == 0 for rc, _ in results), results
    assert _files(killed) == one
    assert {name: (killed / name).stat().st_mtime_ns for name in done} == done  # finished shards kept, not redone


def test_a_rank_that_fails_stops_the_other_with_its_error(tmp_path):
    cmd, env = _setup(tmp_path, n=4)
    bad = sorted((tmp_path / "photos").iterdir())[1]  # shard 1: rank 1's
    bad.write_bytes(b"not a jpeg")
    results = _wait(_ranks([*cmd, "--out", str(tmp_path / "out")], env))
    assert all(rc != 0 for rc, _ in results), results
    assert bad.name in results[1][1]
    assert "rank 1 failed" in results[0][1] and bad.name in results[0][1]
    assert "Traceback" not in results[0][1] + results[1][1]  # a clear error, not a raw trace
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_rank_that_fails_before_the_export_begins_stops_the_other(tmp_path):
    """One rank cannot list the inputs (its copy of the source fails): both stop with its
    error instead of the other waiting for it."""
    import tarfile  # noqa: PLC0415

    cmd, env = _setup(tmp_path, n=2)
    tar_path = tmp_path / "photos.tar"
    with tarfile.open(tar_path, "w") as tar:
        for p in sorted((tmp_path / "photos").iterdir()):
            tar.add(p, arcname=p.name)
    source = f"pipe:sh -c 'if [ $RANK = 1 ]; then echo no route to host >&2; exit 7; fi; cat {tar_path}'"
    data = cmd.index("--data") + 1
    results = _wait(_ranks([*cmd[:data], source, *cmd[data + 1 :], "--out", str(tmp_path / "out")], env))
    assert all(rc != 0 for rc, _ in results), results
    assert "exited with status 7: no route to host" in results[1][1]
    assert "rank 1 failed" in results[0][1] and "no route to host" in results[0][1]
    assert "Traceback" not in results[0][1] + results[1][1]
