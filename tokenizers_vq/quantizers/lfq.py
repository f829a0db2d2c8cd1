"""Lookup-free quantization (Yu et al. 2023, MAGVIT-v2) and binary spherical
quantization (Zhao et al. 2024, BSQ-ViT).

Each of ``num_bits`` channels is quantised to its sign: the implicit codebook is
``{-s, +s}^num_bits`` (``2^num_bits`` codes), never materialised. The entropy
penalty (low per-sample entropy, high codebook entropy) is computed over groups of
``group_bits`` channels, ``2^group_bits`` sub-codes each: exact (one group) up to
``2^10`` codes, beyond that BSQ's factorised approximation, so its cost stays bounded.
Groups that are too small let the bits of different groups move together: each group
uses all its sub-codes while the joint codebook is barely used (10 bits in groups of 2
trained an image tokenizer to 6.7% usage, one group of 10 to 55%; BSQ 11% -> 87%).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.distributed import mean_over_ranks
from tokenizers_vq.quantizers._functional import code_histogram, l2norm, perplexity, straight_through
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_number, load_settings


def _entropy(p: Tensor, eps: float = 1e-8) -> Tensor:
    return -(p * torch.log(p.clamp_min(eps))).sum(-1)


class LFQ(Quantizer):
    """Sign quantizer, ``(B, *S, D) -> codes (B, *S)`` in ``[0, 2^num_bits)``.

    Args:
        dim: latent size ``D``; projected to ``num_bits`` channels (and back) when
            it differs.
        num_bits: code bits; the codebook has ``2^num_bits`` entries (at most 62).
        spherical: BSQ: l2-normalise the latent and use codes ``±1/sqrt(num_bits)``
            (on the unit sphere); otherwise LFQ codes ``±1``.
        entropy_weight: weight of ``H(q|x) - diversity_weight * H(q)``.
        diversity_weight: weight of the codebook-entropy term inside that.
        commitment_weight: weight of ``|x - sg(q)|^2``.
        temperature: softmax temperature of the soft assignments, at least 1e-20,
            which keeps the scaled logits of latents up to ``MAX_LATENT_MAGNITUDE`` finite in float32.
        group_bits: bits per entropy group (must divide ``num_bits``, at most 16); defaults to
            the largest divisor of ``num_bits`` that is at most 10. Training keeps about
            ``5 * (num_bits / group_bits) * 2^group_bits`` floats per latent for it
            (10 bits: 5,120; 18 bits in groups of 9: 5,120; in groups of 3: 240): pass a
            smaller ``group_bits`` for very many latents. A prime ``num_bits`` above 10
            gets groups of one bit, the weakest entropy estimate.
        check_finite: see :class:`Quantizer`.

    Example:
        >>> bsq = LFQ(dim=32, num_bits=18, spherical=True)
        >>> bsq.codebook_size
        262144
        >>> bsq(torch.randn(2, 16, 32)).codes.shape
        torch.Size([2, 16])
    """

    exchanges = True  # the entropy's code probabilities are averaged over ranks in a training step

    def __init__(
        self,
        dim: int,
        num_bits: int,
        spherical: bool = False,
        entropy_weight: float = 0.1,
        diversity_weight: float = 1.0,
        commitment_weight: float = 0.25,
        temperature: float = 0.01,
        group_bits: int | None = None,
        check_finite: bool = True,
    ):
        super().__init__(dim, check_finite)
        check_number("num_bits", num_bits, 1, 62, integer=True)
        check_number("temperature", temperature, 1e-20)
        for name, value in (("entropy_weight", entropy_weight), ("diversity_weight", diversity_weight),
                            ("commitment_weight", commitment_weight)):
            check_number(name, value, 0)
        if group_bits is None:
            group_bits = max(g for g in range(1, 11) if num_bits % g == 0)
        check_number("group_bits", group_bits, 1, integer=True)
        if group_bits > 16:  # (2^g, g) sub-codes are built, and (N, num_bits / g, 2^g) soft assignments
            raise ValueError(f"group_bits={group_bits} is over 16: each entropy group's 2^group_bits sub-codes are "
                             "built and training keeps about 5 * 2^group_bits floats per latent for each group; pass "
                             "a smaller divisor of num_bits (by default the largest one up to 10)")
        if num_bits % group_bits:
            raise ValueError(f"group_bits={group_bits} must divide num_bits={num_bits}")
        self.num_bits, self.spherical, self.group_bits = num_bits, spherical, group_bits
        self.entropy_weight, self.diversity_weight = entropy_weight, diversity_weight
        self.commitment_weight, self.temperature = commitment_weight, temperature
        self.scale = 1.0 / math.sqrt(num_bits) if spherical else 1.0
        self.project_in = nn.Linear(dim, num_bits) if dim != num_bits else nn.Identity()
        self.project_out = nn.Linear(num_bits, dim) if dim != num_bits else nn.Identity()
        self.register_buffer("_powers", 2 ** torch.arange(num_bits, dtype=torch.int64), persistent=False)
        self.register_buffer("_num_bits", torch.tensor(num_bits))  # in the state dict: see load_settings
        self.register_buffer("_spherical", torch.tensor(spherical))
        # All 2^g sign patterns of one entropy group, (2^g, g).
        sub = ((torch.arange(2**group_bits).unsqueeze(1) >> torch.arange(group_bits)) & 1).float()
        self.register_buffer("_sub_codes", self._values(sub), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_settings(self, state_dict, prefix, {"_num_bits": int, "_spherical": bool})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def codebook_size(self) -> int:
        return 2**self.num_bits

    def _values(self, bits: Tensor) -> Tensor:
        """Bits in {0, 1} -> code values in {-scale, +scale}."""
        return (bits * 2 - 1) * self.scale

    def _forward(self, z: Tensor) -> QuantizerOutput:
        h = self.project_in(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = h.float()
            if self.spherical:
                x = l2norm(x)
            bits = (x > 0).long()
            q = self._values(bits.float())
            codes = (bits * self._powers).sum(-1)
            losses = {"commitment": self.commitment_weight * F.mse_loss(x, q.detach())}
            metrics = {"bit_balance": bits.float().mean()}
            if self.entropy_weight > 0 and self.training:
                sample_h, codebook_h = self._entropies(x)
                losses["entropy"] = self.entropy_weight * (sample_h - self.diversity_weight * codebook_h)
                metrics["codebook_entropy_bits"] = codebook_h.detach() / math.log(2)
            if self.codebook_size <= 2**24:
                counts = code_histogram(codes, self.codebook_size)
                metrics.update(perplexity=perplexity(counts), usage_batch=(counts > 0).float().mean())
            xq = straight_through(x, q).to(h.dtype)
        return QuantizerOutput(self.project_out(xq).to(z.dtype), codes, losses, metrics)

    def _entropies(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Group-factorised per-sample entropy ``E_x H(q|x)`` and codebook entropy
        ``H(E_x q)`` in nats, each summed over the ``num_bits / group_bits`` groups.

        Soft assignment to the sub-codes ``c`` of a group: ``softmax(-|x - c|^2 / T)``,
        i.e. ``softmax(2 x.c / T)`` since ``|c|`` is the same for every sub-code.
        """
        g = self.group_bits
        xg = x.reshape(-1, self.num_bits // g, g)
        logits = 2.0 * (xg @ self._sub_codes.t().to(xg.dtype)) / self.temperature
        p = logits.softmax(-1)  # (N, groups, 2^g)
        sample_h = _entropy(p).sum(-1).mean()
        avg_p = mean_over_ranks(p.mean(0))
        return sample_h, _entropy(avg_p).sum()

    def _decode(self, codes: Tensor) -> Tensor:
        bits = (codes.long().unsqueeze(-1) // self._powers) % 2
        return self._project_out(self._values(bits.float()))
