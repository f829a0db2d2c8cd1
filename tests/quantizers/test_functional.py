"""The functional entry points (code statistics, nearest-code search) refuse inputs they
would otherwise truncate or read in part."""

from __future__ import annotations

import pytest
import torch

from tokenizers_vq.quantizers import code_statistics, nearest_codes


def test_code_statistics_refuses_ids_and_sizes_that_are_not_whole_numbers():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    for idx in (torch.tensor([0.9, 1.6, 2.2]), torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64),
                torch.tensor([True, False, True]), torch.tensor([0, 1, 2], dtype=torch.complex64)):
        with pytest.raises(ValueError, match=f"idx must hold integer code ids, got dtype {idx.dtype}: pass the codes"):
            code_statistics(x, idx, 3)
    for size in (2.9, 3.0, "3", True):
        with pytest.raises(ValueError, match="the number of codes must be a whole number, got .*: pass size as an int"):
            code_statistics(x, torch.tensor([0, 1, 2]), size)
    counts, sums = code_statistics(x, torch.tensor([0, 1, 2], dtype=torch.int16), 3)
    assert counts.tolist() == [1.0, 1.0, 1.0] and torch.equal(sums, x)


def test_nearest_codes_refuses_complex_vectors():
    """A complex tensor cast to real loses its imaginary part (torch only warns): the search would
    match real parts alone."""
    q = torch.tensor([[0.0 + 5.0j, 0.0 + 0.0j]])
    cb = torch.tensor([[0.0 + 0.0j, 0.0 + 0.0j], [0.0 + 5.0j, 0.0 + 0.0j]])  # row 1 is q: real parts alone pick row 0
    for x, c in ((q, cb), (q, cb.real), (q.real, cb)):
        with pytest.raises(ValueError, match="nearest_codes searches real vectors, .*torch.view_as_real"):
            nearest_codes(x, c)
    real = lambda t: torch.view_as_real(t).flatten(-2)  # noqa: E731
    assert nearest_codes(real(q), real(cb))[1].tolist() == [1]
