"""The binary mapper (Fleuret 2025, arXiv 2510.17558): sampled bits as a discrete bottleneck.

The latent is projected to ``bits`` logits; in training each bit is drawn from
``Bernoulli(sigmoid(logit / temperature))``, in eval it is ``logit > 0`` (so that
``decode(encode(z))`` equals the eval forward; the reference implementation samples in eval
too unless told otherwise). The code is the bits read as a binary number, and the decoder gets
that code's row of a learned ``(2^bits, D)`` table. A straight-through estimator on the one-hot
code carries the gradient: the logits get that of the table's expectation under the bits' joint
probability, the table only its chosen rows' (as a one-hot input to a linear layer would).
The ``kl`` loss limits what the bits carry, as a VAE's KL term does: the KL divergence of the
bits' distribution from uniform, ``bits ln 2 - H``, above ``kl_threshold`` nats (one bit by
default), averaged over positions; it is reported in eval too (the reference computes it in
training only).

The joint probability is ``N x 2^bits`` in training (that is the method), so ``bits`` is at
most 16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import code_histogram, perplexity
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_number, flatten_latent

MAX_BITS = 16


class BinaryMapper(Quantizer):
    """``(B, *S, D) -> codes (B, *S)`` with codes in ``[0, 2^bits)``.

    Args:
        dim: latent size ``D``.
        bits: bits per position, in ``[1, 16]`` (``2^bits`` codes).
        temperature: of the bits' sampling in training.
        kl_threshold: nats of KL from uniform bits that cost nothing (``ln 2``: one bit, as the
            reference). The loss holds each position's bits near uniform, which limits what a
            position carries to about this much: a stochastic bottleneck rather than ``bits``
            bits per token (``kl_weight=0`` lifts the limit).
        kl_weight: weight of the ``kl`` loss.
        check_finite: see :class:`Quantizer`.

    Example:
        >>> q = BinaryMapper(dim=16, bits=10)
        >>> out = q(torch.randn(2, 8, 16))
        >>> q.codebook_size, out.codes.shape, sorted(out.losses)
        (1024, torch.Size([2, 8]), ['kl'])
    """

    def __init__(self, dim: int, bits: int, temperature: float = 1.0, kl_threshold: float = math.log(2),
                 kl_weight: float = 1.0, check_finite: bool = True):
        super().__init__(dim, check_finite)
        if isinstance(bits, int) and bits > MAX_BITS:
            raise ValueError(f"bits must be a whole number in [1, {MAX_BITS}], got {bits}: training holds the bits' joint "
                             f"probability over all 2^bits codes per position; for more bits group several mappers "
                             f"(GroupedQuantizer) or use LFQ")
        check_number("bits", bits, 1, MAX_BITS, integer=True)
        check_number("temperature", temperature, 0, open_low=True)
        for name, value in (("kl_threshold", kl_threshold), ("kl_weight", kl_weight)):
            check_number(name, value, 0)
        self.bits, self.temperature, self.kl_threshold, self.kl_weight = bits, temperature, kl_threshold, kl_weight
        self.project_in = nn.Linear(dim, bits)
        self.embed = nn.Parameter(torch.randn(2**bits, dim) / math.sqrt(dim))
        self.register_buffer("_powers", 2 ** torch.arange(bits), persistent=False)
        table = (torch.arange(2**bits)[:, None] & self._powers) != 0  # (2^bits, bits): each code's bits
        self.register_buffer("_table", table, persistent=False)  # bool: kept by a cast of the weights

    @property
    def codebook_size(self) -> int:
        return 2**self.bits

    def _codes(self, z: Tensor) -> Tensor:
        return self._sample(self.project_in(z).float(), False)

    def _sample(self, logits: Tensor, sample: bool) -> Tensor:
        """The code of each position: sampled bits, or ``logit > 0``."""
        on = torch.rand_like(logits) < torch.sigmoid(logits / self.temperature) if sample else logits > 0
        return (on.long() * self._powers).sum(-1)

    def _forward(self, z: Tensor) -> QuantizerOutput:
        logits = self.project_in(z)
        flat, lead = flatten_latent(logits)
        with torch.autocast(device_type=z.device.type, enabled=False):
            lf, table = flat.float(), self.embed.float()
            idx = self._sample(lf, self.training)
            hard = F.embedding(idx, table)
            if self.training:  # the table's expectation under the bits' joint probability carries the gradient
                on = self._table.float()
                joint = (F.logsigmoid(lf) @ on.T + F.logsigmoid(-lf) @ (1 - on).T).exp()
                soft = joint @ table.detach()
                hard = hard + (soft - soft.detach())
            entropy = -(torch.sigmoid(lf) * F.logsigmoid(lf) + torch.sigmoid(-lf) * F.logsigmoid(-lf)).sum(-1)
            kl = F.relu(self.bits * math.log(2) - entropy - self.kl_threshold).mean()
            counts = code_histogram(idx, self.codebook_size)
            metrics = {"perplexity": perplexity(counts), "usage_batch": (counts > 0).float().mean()}
        quantized = hard.reshape(*lead, -1).to(z.dtype)
        return QuantizerOutput(quantized, idx.reshape(lead), {"kl": self.kl_weight * kl}, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        return F.embedding(codes.long(), self.embed.float())
