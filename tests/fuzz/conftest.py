"""Hypothesis profiles for the fuzz tests.

By default a short run: 20 examples per test besides the explicit ones, derandomized
so CI sees the same inputs every time, about 25 s in all on two CPU cores.
``TVQ_FUZZ_EXAMPLES=N`` selects a long run of ``N`` examples per test with fresh random
inputs, e.g. ``TVQ_FUZZ_EXAMPLES=2000 pytest tests/fuzz``; a failure prints the example
and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "tvq-fuzz",
    max_examples=20,
    derandomize=True,
    deadline=10_000,  # ms; a generous ceiling for a loaded two-core machine, not a benchmark
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "tvq-fuzz-long",
    parent=settings.get_profile("tvq-fuzz"),
    max_examples=int(os.environ.get("TVQ_FUZZ_EXAMPLES") or 0) or 1,
    derandomize=False,
)
settings.load_profile("tvq-fuzz-long" if os.environ.get("TVQ_FUZZ_EXAMPLES") else "tvq-fuzz")
