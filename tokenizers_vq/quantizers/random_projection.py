"""Random-projection quantizer: BEST-RQ's frozen targets for self-supervised learning.

Chiu et al. 2022, "Self-supervised Learning with Random-projection Quantizer for Speech
Recognition" (arXiv 2202.01855). Features are normalised (zero mean, unit variance over
the last axis), projected by a frozen Xavier-initialised matrix ``P`` ``(D, d)`` and
matched by cosine to a frozen codebook of ``K`` standard-normal rows: nothing trains, so
the codes are stable targets for a masked-prediction model from the first step.

There is no decoder in BEST-RQ; to keep the contract (``decode(encode(z))`` equals
``forward(z).quantized``), a code decodes to its codeword mapped back to ``D`` by the
pseudo-inverse of ``P``, and ``forward`` passes gradients straight through. Use
:meth:`~tokenizers_vq.quantizers.base.Quantizer.encode` for targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenizers_vq.quantizers._functional import code_histogram, l2norm, nearest_codes, perplexity, straight_through
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_number, flatten_latent, load_settings


def _unit_normal_rows(n: int, d: int, gen: torch.Generator) -> Tensor:
    """``(n, d)`` fp32 rows of standard-normal draws scaled to unit length, the same bits on
    every CPU kernel: ``torch.randn`` takes another path per vector kernel (AVX2, AVX512,
    none) and ``torch.rand`` does not; Box-Muller makes its uniforms normal in float64, whose
    last-bit differences between kernels the rounding to fp32 removes (but for about one
    value in 1e9, one lying within that bit of a float32 rounding boundary)."""
    u = torch.rand(2, n * d, generator=gen, dtype=torch.float64)
    g = torch.sqrt(-2 * torch.log1p(-u[0])) * torch.cos(2 * math.pi * u[1])  # log1p(-u): u < 1, finite
    return l2norm(g.view(n, d)).float()


class RandomProjectionQuantizer(Quantizer):
    """Frozen projection + frozen codebook, ``(B, *S, D) -> codes (B, *S)``.

    Args:
        dim: feature size ``D``.
        codebook_size: ``K`` codes (BEST-RQ: 8192).
        codebook_dim: ``d``, the projected size (BEST-RQ: 16).
        normalize_input: standardise each feature vector over its last axis first (the
            paper normalises input features so the projection sees unit scale).
        seed: the generator seed of ``P`` and the codebook, which it fixes bit for bit on
            every CPU (see :func:`_unit_normal_rows`): the same seed gives the same targets on
            every machine, but for features whose two nearest codes lie within the float
            rounding of the projection.
        check_finite: see :class:`Quantizer`.

    Example:
        >>> q = RandomProjectionQuantizer(dim=80, codebook_size=8192)
        >>> q.encode(torch.randn(2, 100, 80)).shape
        torch.Size([2, 100])
        >>> sum(p.numel() for p in q.parameters())  # nothing trains
        0
    """

    def __init__(self, dim: int, codebook_size: int = 8192, codebook_dim: int = 16, normalize_input: bool = True,
                 seed: int = 0, check_finite: bool = True):
        super().__init__(dim, check_finite)
        check_number("codebook_size", codebook_size, 1, integer=True)
        check_number("codebook_dim", codebook_dim, 1, integer=True)
        self._size, self.codebook_dim, self.normalize_input = codebook_size, codebook_dim, normalize_input
        gen = torch.Generator().manual_seed(seed)
        bound = (6.0 / (dim + codebook_dim)) ** 0.5  # Xavier uniform
        proj = (torch.rand(dim, codebook_dim, generator=gen) * 2 - 1) * bound
        self.register_buffer("projection", proj)
        self.register_buffer("codebook", _unit_normal_rows(codebook_size, codebook_dim, gen))
        self.register_buffer("back", torch.linalg.pinv(proj))  # (d, D): codeword -> feature space
        self.register_buffer("_normalize_input", torch.tensor(bool(normalize_input)))  # checked at load

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_settings(self, state_dict, prefix, {"_normalize_input": bool})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def codebook_size(self) -> int:
        return self._size

    def _project(self, flat: Tensor) -> Tensor:
        x = flat.float()
        if self.normalize_input:
            x = F.layer_norm(x, x.shape[-1:])
        return l2norm(x @ self.projection.float())

    def _forward(self, z: Tensor) -> QuantizerOutput:
        flat, lead = flatten_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            cb = self.codebook.float()
            _, idx = nearest_codes(self._project(flat.detach()), cb, "cosine")
            q = cb[idx] @ self.back.float()
            counts = code_histogram(idx, self._size)
            quantized = straight_through(flat.float(), q).to(z.dtype).reshape(*lead, -1)
        metrics = {"perplexity": perplexity(counts), "usage_batch": (counts > 0).float().mean()}
        return QuantizerOutput(quantized, idx.reshape(lead), {}, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        with torch.autocast(device_type=codes.device.type, enabled=False):
            return self.codebook.float()[codes.long()] @ self.back.float()
