"""Latent quantization (Hsu et al. 2023, "Disentanglement via Latent Quantization").

Every latent dimension has its own small learnable scalar codebook and snaps to
its nearest value; the code of a position is the vector of per-dimension value
indices. The paper pairs this with straight-through gradients, a quantization
loss that moves the values and a commitment loss that moves the encoder, and an
unusually high weight decay: see :func:`latent_quantization_param_groups`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import BACKENDS, Backend, code_histogram, nearest_codes, perplexity, straight_through
from tokenizers_vq.quantizers.base import (MAX_LATENT_MAGNITUDE, Quantizer, QuantizerOutput, check_choice, check_number,
                                           flatten_latent)


class LatentQuantizer(Quantizer):
    """Per-dimension scalar codebooks, ``(B, *S, D) -> codes (B, *S, D)`` in ``[0, n)``.

    Args:
        dim: latent size ``D`` (one scalar codebook per dimension).
        values_per_dim: ``n``, values in each dimension's codebook.
        init_range: values start evenly spaced over ``[-init_range, init_range]``; in
            ``(0, MAX_LATENT_MAGNITUDE]``.
        quantize_weight: weight of ``|sg(z) - z_q|^2``, which moves the values.
        commit_weight: weight of ``|z - sg(z_q)|^2``, which moves the encoder.
        backend: nearest-code search backend, see :func:`nearest_codes`.
        check_finite: see :class:`Quantizer`.

    The values are the parameter ``values`` ``(D, n)``; the codebook of dimension
    ``i`` is ``values[i]`` (they may cross during training; nothing assumes order).

    Example:
        >>> lq = LatentQuantizer(dim=10, values_per_dim=10)
        >>> out = lq(torch.randn(4, 10))
        >>> out.codes.shape, lq.codebook_size
        (torch.Size([4, 10]), 10)
    """

    def __init__(
        self,
        dim: int,
        values_per_dim: int = 10,
        init_range: float = 1.0,
        quantize_weight: float = 1.0,
        commit_weight: float = 0.25,
        backend: Backend = "auto",
        check_finite: bool = True,
    ):
        super().__init__(dim, check_finite)
        check_number("values_per_dim", values_per_dim, 2, integer=True)
        check_number("init_range", init_range, 0, MAX_LATENT_MAGNITUDE, open_low=True)
        for name, value in (("quantize_weight", quantize_weight), ("commit_weight", commit_weight)):
            check_number(name, value, 0)
        check_choice("backend", backend, BACKENDS)
        self.values_per_dim, self.backend = values_per_dim, backend
        self.quantize_weight, self.commit_weight = quantize_weight, commit_weight
        grid = torch.linspace(-init_range, init_range, values_per_dim)
        self.values = nn.Parameter(grid.repeat(dim, 1))

    @property
    def codebook_size(self) -> int:
        return self.values_per_dim

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def _forward(self, z: Tensor) -> QuantizerOutput:
        flat, lead = flatten_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            xf = flat.float()
            values = self.values.float()
            # one scalar search per dimension: (N, 1) queries against that dimension's (n, 1) values
            idx = torch.stack(
                [nearest_codes(xf[:, i : i + 1].detach(), values[i].detach().unsqueeze(1), "l2", self.backend)[1]
                 for i in range(self.dim)],
                dim=1,
            )
            q = values.gather(1, idx.t()).t()  # (N, D), differentiable w.r.t. the values
            losses = {
                "quantization": self.quantize_weight * F.mse_loss(q, xf.detach()),
                "commitment": self.commit_weight * F.mse_loss(xf, q.detach()),
            }
            counts = code_histogram(idx + torch.arange(self.dim, device=idx.device) * self.values_per_dim,
                                    self.dim * self.values_per_dim).view(self.dim, -1)
            used = (counts > 0).float().mean()
            ppl = torch.stack([perplexity(c) for c in counts.unbind(0)]).mean()
            xq = straight_through(xf, q).reshape(*lead, self.dim)
        metrics = {"usage_batch": used, "perplexity_per_dim": ppl}
        return QuantizerOutput(xq.to(z.dtype), idx.reshape(*lead, self.dim), losses, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        flat = codes.reshape(-1, self.dim).long()
        q = self.values.float().gather(1, flat.t()).t()
        return q.reshape(codes.shape)


def latent_quantization_param_groups(
    model: nn.Module, weight_decay: float = 0.1, codebook_weight_decay: float = 0.1
) -> list[dict]:
    """Optimizer parameter groups for the high-weight-decay recipe.

    Hsu et al. regularise with an "unusually high" weight decay (AdamW), which
    drives the model to a parsimonious use of the few values per dimension. The
    defaults (0.1 for both groups) are a starting point, not the paper's tuned
    values: sweep them per dataset. This helper puts the scalar codebooks of every
    :class:`LatentQuantizer` in ``model`` in their own group so that their decay is
    set separately, e.g.::

        groups = latent_quantization_param_groups(model, weight_decay=0.1, codebook_weight_decay=0.1)
        opt = torch.optim.AdamW(groups, lr=1e-3)

    Args:
        model: any module containing one or more :class:`LatentQuantizer`.
        weight_decay: decay of every other trainable parameter.
        codebook_weight_decay: decay of the quantizers' ``values``.

    Returns:
        ``[{"params": codebook values, "weight_decay": codebook_weight_decay},
        {"params": the rest, "weight_decay": weight_decay}]`` (empty groups dropped).
    """
    values = {id(m.values): m.values for m in model.modules() if isinstance(m, LatentQuantizer)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in values]
    groups = [
        {"params": list(values.values()), "weight_decay": codebook_weight_decay},
        {"params": rest, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]
