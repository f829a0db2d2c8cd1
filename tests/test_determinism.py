"""The CPU search answers the same whatever the CPU: ties go to the lowest index under every
instruction set, MKL code path and thread count, and the tokenizer's codes do not depend on
the thread count. Each setting runs in a fresh process (tests/determinism_worker.py), as
they are read at start-up."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenizers_vq.quantizers._functional import nearest_codes_reference

WORKER = Path(__file__).with_name("determinism_worker.py")
CAPABILITIES = ("default", "avx2", "avx512")  # ATEN_CPU_CAPABILITY on x86, lowest first
# (ATEN_CPU_CAPABILITY, MKL_CBWR, OMP_NUM_THREADS): each pair of values of any two of them occurs
SETTINGS = [("default", "COMPATIBLE", 1), ("default", "AUTO", 2), ("avx2", "COMPATIBLE", 2),
            ("avx2", "AUTO", 1), ("avx512", "COMPATIBLE", 1), ("avx512", "AUTO", 2)]


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out


def tie_cases() -> dict[str, dict]:
    """Codebooks whose codewords repeat ``distinct`` apart (at ``j``, ``j + distinct``, ...),
    queried near and at them; ``blocks`` (``block_elems``) split the search over matmuls of
    other shapes: single rows, short last blocks of codewords or of rows, one block."""
    g = torch.Generator().manual_seed(0)
    small = torch.randn(10, 4, generator=g).repeat(3, 1)
    wide = torch.randn(300, 24, generator=g).repeat(3, 1)
    x_wide = wide[torch.randint(0, 900, (128,), generator=g)] + 0.05 * torch.randn(128, 24, generator=g)
    x_wide = torch.cat([x_wide, wide[[899]]])  # one query on a codeword exactly
    scaled = torch.cat([wide[:300], 2 * wide[:300], 0.5 * wide[:300]])  # equal directions: ties for cosine only
    both = ["l2", "cosine"]
    return {
        "small": {"x": small[torch.randint(0, 30, (50,), generator=g)] + 0.01 * torch.randn(50, 4, generator=g),
                  "codebook": small, "distinct": 10, "blocks": (1, 4, 11, 2**24), "metrics": both},
        "wide": {"x": x_wide, "codebook": wide, "distinct": 300, "blocks": (301, 32 * 900, 2**24), "metrics": both},
        "one_row": {"x": x_wide[:1], "codebook": wide, "distinct": 300, "blocks": (301, 2**24), "metrics": both},
        "scaled": {"x": x_wide, "codebook": scaled, "distinct": 300, "blocks": (2**24,), "metrics": ["cosine"]},
    }


def supported(capability: str) -> bool:
    have = torch.backends.cpu.get_cpu_capability().lower()
    if capability == "default":
        return True
    return platform.machine().lower() in ("x86_64", "amd64") and have in CAPABILITIES and \
        CAPABILITIES.index(capability) <= CAPABILITIES.index(have)


@pytest.fixture(scope="module")
def ties(tmp_path_factory):
    """The tie cases saved for the workers, and this process's answers to them."""
    cases = tie_cases()
    path = tmp_path_factory.mktemp("ties") / "cases.pt"
    torch.save(cases, path)
    here = {(name, metric, block): nearest_codes_reference(case["x"], case["codebook"], metric, block)
            for name, case in cases.items() for metric in case["metrics"] for block in case["blocks"]}
    return path, cases, here


@pytest.mark.parametrize("capability,cbwr,threads", SETTINGS)
def test_search_ties_and_answers_do_not_depend_on_the_cpu_settings(tmp_path, ties, capability, cbwr, threads):
    if not supported(capability):
        pytest.skip(f"this CPU does not run ATen's {capability} kernels")
    path, cases, here = ties
    env = {"ATEN_CPU_CAPABILITY": capability, "MKL_CBWR": cbwr, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    finish(run_worker("search", str(path), str(tmp_path / "out.pt"), env=env))
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out.pop("capability") == capability.upper() and out.pop("threads") == threads, "setting not applied"
    assert out.keys() == here.keys()
    for (name, metric, block), (dist, idx) in out.items():
        ties_lost = (idx >= cases[name]["distinct"]).nonzero().flatten().tolist()
        assert not ties_lost, f"{name} {metric} block {block}: rows {ties_lost} got codes {idx[ties_lost].tolist()}"
        # and the very same answer as this process's, bit for bit
        here_d, here_i = here[name, metric, block]
        assert torch.equal(idx, here_i) and dist.numpy().tobytes() == here_d.numpy().tobytes()


def test_image_token_files_do_not_depend_on_the_thread_count(tmp_path):
    """Token files of a real photo written by two processes, with 1 and with 2 threads, are
    byte-identical (codes, and a header written in a fixed order)."""
    pytest.importorskip("matplotlib")  # the bundled photo ships with it
    from safetensors import safe_open  # noqa: PLC0415

    procs = [run_worker("encode", str(n), str(tmp_path / f"threads{n}.tvq")) for n in (1, 2)]
    for p in procs:
        finish(p)
    one, two = ((tmp_path / f"threads{n}.tvq").read_bytes() for n in (1, 2))
    assert one == two
    with safe_open(tmp_path / "threads1.tvq", "pt") as f:
        assert list(f.keys()) == ["codes.0"] and f.get_tensor("codes.0").numel() > 1000
