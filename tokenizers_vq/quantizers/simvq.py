"""SimVQ: a frozen random codebook seen through one learned linear map.

Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One
Linear Layer" (arXiv 2411.02038). The codebook is ``C = E W^T`` with ``E`` ``(K, d)``
drawn once and frozen and ``W`` ``(d, d)`` learned: a gradient step on ``W`` moves every
codeword at once, not only the few a batch selects, which is why the paper reports full
codebook usage at sizes where plain VQ collapses (up to 262,144 codes). Losses as in VQ-VAE:
``|sg(z) - q|^2`` (it trains ``W``) plus ``beta |z - sg(q)|^2``; straight-through gradients
to the encoder (or, by ``estimator``, the rotation trick or noise substitution in training). Its residual form is :class:`~tokenizers_vq.quantizers.ResidualQuantizer`
over SimVQ levels (``QuantizerConfig("simvq", ..., levels=4)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import (BACKENDS, ESTIMATORS, Estimator, code_histogram, estimate, nearest_codes,
                                                  perplexity)
from tokenizers_vq.quantizers.base import (Quantizer, QuantizerOutput, check_choice, check_number, codebook_projections,
                                           flatten_latent)


class SimVQ(Quantizer):
    """Nearest-codeword quantizer over ``C = E W^T``, ``(B, *S, D) -> codes (B, *S)``.

    Args:
        dim: latent size ``D``; projected to ``codebook_dim`` (and back) when given.
        codebook_size: ``K`` codes.
        codebook_dim: ``d``, the size of the codewords (default ``D``).
        beta: weight of the commitment loss ``|z - sg(q)|^2``.
        estimator: the gradient that reaches the encoder: ``"ste"`` (straight-through,
            as the paper) or ``"rotation"`` (the rotation trick, as vector-quantize-pytorch's
            SimVQ does by default) or ``"nsvq"`` / ``"diveq"`` (noise substitution in training).
        map_init: how the map ``W`` starts: ``"linear"`` (PyTorch's ``nn.Linear`` default,
            uniform in ``+-1/sqrt(d)``, as the paper's code and vector-quantize-pytorch) or
            ``"orthogonal"`` (a rotation: the codebook keeps the frozen one's spread). The image
            tokenizer trained better from ``"linear"``, with either estimator
            (``eval/results/quantizer_shootout/cpu_2core_simvq_init/``).
        backend: nearest-code search backend (see
            :func:`~tokenizers_vq.quantizers.nearest_codes`).
        check_finite: see :class:`Quantizer`.

    Example:
        >>> q = SimVQ(dim=16, codebook_size=512)
        >>> out = q(torch.randn(2, 8, 16))
        >>> out.codes.shape, sorted(out.losses)
        (torch.Size([2, 8]), ['codebook', 'commitment'])
        >>> q.frozen_codebook.requires_grad, q.map.weight.requires_grad
        (False, True)
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int | None = None, beta: float = 0.25,
                 estimator: Estimator = "ste", backend: str = "auto", check_finite: bool = True,
                 map_init: str = "linear"):
        super().__init__(dim, check_finite)
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("map_init", map_init, ("linear", "orthogonal"))
        check_choice("backend", backend, BACKENDS)
        check_number("beta", beta, 0)
        self.estimator = estimator
        d = codebook_projections(self, codebook_size, codebook_dim)
        self._size, self.codebook_dim, self.beta, self.backend = codebook_size, d, beta, backend
        # E ~ N(0, 1/d): rows of about unit norm (the "linear" map then shortens them by about 1/sqrt(3))
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, d) / math.sqrt(d))
        self.map = nn.Linear(d, d, bias=False)
        if map_init == "orthogonal":
            nn.init.orthogonal_(self.map.weight)

    @property
    def codebook_size(self) -> int:
        return self._size

    @property
    def codebook(self) -> Tensor:
        """The effective ``(K, d)`` fp32 codebook ``E W^T`` (differentiable in ``W``)."""
        with torch.autocast(device_type=self.frozen_codebook.device.type, enabled=False):
            return F.linear(self.frozen_codebook.float(), self.map.weight.float())

    def _forward(self, z: Tensor) -> QuantizerOutput:
        x = self.project_in(z)
        flat, lead = flatten_latent(x)
        with torch.autocast(device_type=z.device.type, enabled=False):
            xf = flat.float()
            cb = self.codebook
            _, idx = nearest_codes(xf.detach(), cb.detach(), "l2", self.backend)
            q = F.embedding(idx, cb)
            counts = code_histogram(idx, self._size)  # this rank's: diagnostics only, no collective
            losses = {"commitment": self.beta * F.mse_loss(xf, q.detach()), "codebook": F.mse_loss(q, xf.detach())}
            metrics = {"perplexity": perplexity(counts), "usage_batch": (counts > 0).float().mean()}
            xq = estimate(self.estimator, xf, q, self.training).to(flat.dtype).reshape(*lead, -1)
        quantized = self.project_out(xq).to(z.dtype)
        return QuantizerOutput(quantized, idx.reshape(lead), losses, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        return self._project_out(F.embedding(codes.long(), self.codebook))
