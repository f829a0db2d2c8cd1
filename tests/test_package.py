"""The installed package: cheap import, namespaced folders, README examples, `tvq demo`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokenizers_vq.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_cheap_and_namespaced(tmp_path):
    heavy = run_python(
        "import sys, tokenizers_vq; print([m for m in ('torchvision', 'torchaudio', 'lpips', 'triton') if m in sys.modules])",
        tmp_path,
    )
    assert heavy == "[]"
    found = run_python(
        "import importlib.util as u, tokenizers_vq.kernels, tokenizers_vq.train, tokenizers_vq.eval;"
        "print([n for n in ('kernels', 'train', 'eval') if u.find_spec(n) is not None])",
        tmp_path,  # outside the repo: only what is installed is importable
    )
    assert found == "[]"
    lazy = run_python(
        "import sys, tokenizers_vq as t; before = 'tokenizers_vq.export' in sys.modules;"
        "print(before, [n for n in t.__all__ if getattr(t, n, None) is None])",
        tmp_path,  # every name the package lists resolves; the export module loads on first use only
    )
    assert lazy == "False []"


def test_encoding_on_the_cpu_does_not_load_the_compiler(tmp_path):
    """An eager encode and a VQ training step on the CPU stay off torch.compile's machinery,
    whose import (torch._dynamo) costs about 0.9 s of start-up."""
    loaded = run_python(
        "import sys, torch; from tokenizers_vq import Tokenizer; from tokenizers_vq.quantizers import VectorQuantizer;"
        "Tokenizer.from_pretrained('image').encode(torch.rand(1, 3, 32, 32) * 2 - 1);"
        "q = VectorQuantizer(dim=4, codebook_size=16); q(torch.randn(2, 8, 4, requires_grad=True));"
        "print([m for m in ('torch._dynamo', 'sympy') if m in sys.modules])",
        tmp_path,
    )
    assert loaded == "[]"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2 and "tvq encode" in first_block[0] and "tvq decode" in first_block[0]
    assert first_block[1] in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("block", re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S))
def test_readme_python_examples_run(block: str):
    exec(compile(block, "README.md", "exec"), {})


def test_demo_writes_pictures_and_metrics(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "30"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report["results"]) == {"vq-ema 1024", "rvq 4x256", "fsq 8.8.8.5.5.5"}
    vq, rvq = report["results"]["vq-ema 1024"], report["results"]["rvq 4x256"]
    assert vq["psnr_db"] > 22 and rvq["psnr_db"] > vq["psnr_db"]  # more bits, better
    assert vq["bits_per_pixel"] == 10 / 16 and rvq["bits_per_pixel"] == 32 / 16
    from PIL import Image  # noqa: PLC0415

    with Image.open(tmp_path / "reconstruction.png") as im:
        assert im.size == (4 * 512 + 3 * 4, 600)  # original + three reconstructions, side by side
    with Image.open(tmp_path / "codebook_usage.png") as im:
        assert im.size[0] > 300
    assert "vq-ema 1024" in capsys.readouterr().out


def test_demo_bad_image_fails_clearly_and_keeps_existing_outputs(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("earlier results")
    truncated = tmp_path / "broken.jpg"
    from tokenizers_vq.media import bundled_photo  # noqa: PLC0415

    truncated.write_bytes(bundled_photo().read_bytes()[:2000])
    for bad in (truncated, tmp_path / "missing.png"):
        assert main(["demo", str(bad), "--out", str(tmp_path), "--steps", "1"]) == 2
        assert "tvq: error:" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_text() == "earlier results"
