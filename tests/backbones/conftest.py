"""Backbone tests run their tiny models on one CPU thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # These models are small enough that a second intra-op thread buys nothing,
    # and on a loaded 2-core machine OpenMP's spinning threads made a 40-step
    # run take 20 s instead of 0.6 s. Restored afterwards for other test folders.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
