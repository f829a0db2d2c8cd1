"""IBQ: index backpropagation quantization.

Shi et al. 2024, "Taming Scalable Visual Tokenizer for Autoregressive Image Generation"
(arXiv 2412.02692). The code is the argmax of the logits ``z C^T``; the gradient reaches
the whole codebook through the softmax over those logits (a straight-through estimator on
the one-hot index, ``hard - sg(soft) + soft``), not only the selected codewords, which is
how the paper trains codebooks of 2^18 codes at full usage. Losses: VQ-VAE's codebook and
commitment terms, plus the entropy penalty of the soft assignments (low per-position
entropy, high codebook entropy) that the paper uses.

The logits are ``N x K`` (that is the method): memory grows with the codebook, unlike
:class:`~tokenizers_vq.quantizers.VectorQuantizer`'s fused search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import code_histogram, perplexity
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_number, codebook_projections, flatten_latent


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-8))).sum(-1)


class IBQ(Quantizer):
    """Argmax-of-logits quantizer with gradients to every codeword, ``(B, *S, D) -> codes (B, *S)``.

    Args:
        dim: latent size ``D``; projected to ``codebook_dim`` (and back) when given.
        codebook_size: ``K`` codes.
        codebook_dim: the size of the codewords (default ``D``).
        beta: weight of the commitment loss ``|z - sg(q)|^2``.
        entropy_weight: weight of ``H(per position) - H(codebook)`` of the soft assignments.
        temperature: of the softmax over the logits, at least 1e-20, which keeps
            the scaled logits of latents up to ``MAX_LATENT_MAGNITUDE`` finite in float32.
        check_finite: see :class:`Quantizer`.

    Example:
        >>> q = IBQ(dim=16, codebook_size=1024)
        >>> out = q(torch.randn(2, 8, 16))
        >>> out.codes.shape, sorted(out.losses)
        (torch.Size([2, 8]), ['codebook', 'commitment', 'entropy'])
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int | None = None, beta: float = 0.25,
                 entropy_weight: float = 0.05, temperature: float = 1.0, check_finite: bool = True):
        super().__init__(dim, check_finite)
        check_number("temperature", temperature, 1e-20)
        for name, value in (("beta", beta), ("entropy_weight", entropy_weight)):
            check_number(name, value, 0)
        d = codebook_projections(self, codebook_size, codebook_dim)
        self._size, self.beta, self.entropy_weight, self.temperature = codebook_size, beta, entropy_weight, temperature
        self.embed = nn.Parameter(torch.randn(codebook_size, d) / d**0.5)

    @property
    def codebook_size(self) -> int:
        return self._size

    def _forward(self, z: Tensor) -> QuantizerOutput:
        x = self.project_in(z)
        flat, lead = flatten_latent(x)
        with torch.autocast(device_type=z.device.type, enabled=False):
            xf, cb = flat.float(), self.embed.float()
            logits = xf @ cb.T
            idx = logits.argmax(-1)
            hard = F.embedding(idx, cb)
            losses = {"commitment": self.beta * F.mse_loss(xf, hard.detach()), "codebook": F.mse_loss(hard, xf.detach())}
            if self.training:
                soft = torch.softmax(logits / self.temperature, dim=-1)
                q = hard + (soft - soft.detach()) @ cb  # (hard - sg(soft) + soft) C: gradients through the logits
                if self.entropy_weight > 0:
                    losses["entropy"] = self.entropy_weight * (_entropy(soft).mean() - _entropy(soft.mean(0)))
                xq = xf + (q - xf).detach() + (q - q.detach())  # value: the codeword; gradients: z and C
            else:
                xq = hard
            counts = code_histogram(idx, self._size)
            metrics = {"perplexity": perplexity(counts), "usage_batch": (counts > 0).float().mean()}
        quantized = self.project_out(xq.to(flat.dtype).reshape(*lead, -1)).to(z.dtype)
        return QuantizerOutput(quantized, idx.reshape(lead), losses, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        return self._project_out(F.embedding(codes.long(), self.embed.float()))
