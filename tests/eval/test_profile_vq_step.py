"""The VQ-EMA step profiler the device runs (``eval/gpu/profile_vq_step.py``), on the CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "gpu" / "profile_vq_step.py"


def test_it_reports_time_and_operators_per_step():
    out = subprocess.run([sys.executable, str(SCRIPT), "--cases", "1024x64x8", "--device", "cpu", "--eager-only"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"## 1024 x 64 x 8, eager: \d+\.\d+ ms per step", out)
    ops = int(re.search(r"aten operators per step: (\d+)", out).group(1))
    assert ops > 10  # forward, backward and the EMA update each dispatch several
    assert "aten::addmm" in out  # the search's screening matmul shows among the profiled operators
