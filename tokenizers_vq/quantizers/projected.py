"""Large frozen codebook behind a trainable projector (Zhu et al. 2024, VQGAN-LC:
"Scaling the Codebook Size of VQGAN to 100,000 with a Utilization Rate of 99%").

The codebook is a frozen ``(K, F)`` buffer of features (k-means centres of
pretrained features in the paper); only a projector ``F -> D`` is trained. Every
step projects the *whole* codebook, so every code moves with the projector whether
or not it was chosen, which is what keeps utilisation near 100% at large ``K``.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import (
    Backend,
    Metric,
    code_histogram,
    l2norm,
    nearest_codes,
    perplexity,
    straight_through,
)
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_choice, flatten_latent
from tokenizers_vq.quantizers.kmeans import kmeans

Projector = Literal["linear", "mlp"]


def load_features(features: Tensor | str | os.PathLike, key: str | None = None) -> Tensor:
    """A ``(N, F)`` feature matrix from a tensor or a safetensors file.

    Args:
        features: the tensor itself, or a ``.safetensors`` path.
        key: tensor name inside the file; may be omitted when the file holds one tensor.
    """
    if isinstance(features, Tensor):
        t = features
    else:
        from safetensors.torch import load_file  # noqa: PLC0415

        tensors = load_file(os.fspath(features))
        if key is None:
            if len(tensors) != 1:
                raise ValueError(f"{features} holds tensors {sorted(tensors)}; pass feature_key= to pick one")
            key = next(iter(tensors))
        if key not in tensors:
            raise ValueError(f"{features} has no tensor {key!r}; it holds {sorted(tensors)}")
        t = tensors[key]
    if t.ndim != 2 or not t.is_floating_point() or t.shape[0] == 0:
        raise ValueError(f"codebook features must be a non-empty float (N, F) tensor, got {t.dtype} {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("codebook features contain NaN or Inf values")
    return t.detach().float()


class ProjectedCodebookVQ(Quantizer):
    """Nearest-code search over ``projector(features)``, ``(B, *S, D) -> codes (B, *S)``.

    Args:
        dim: latent size ``D``.
        codebook_size: ``K``.
        features: ``(N, F)`` tensor or safetensors path of features. ``N == K``: used
            as the codebook; ``N > K``: k-means'd to ``K`` centres. ``None``: the
            codebook is the k-means of the model's own latents (``F = D``), collected
            over the first training batches (see ``init_samples``/``init_batches``).
        feature_key: tensor name in a safetensors file with several tensors.
        projector: ``"linear"`` (the paper's) or ``"mlp"`` (``F -> hidden -> D``, GELU).
            A linear projector with ``F == D`` starts as the identity.
        hidden: width of the MLP projector (default ``max(F, D)``).
        metric: ``"l2"`` or ``"cosine"``.
        beta: weight of the commitment loss ``|z - sg(q)|^2``; the codebook loss
            ``|sg(z) - q|^2`` (which trains the projector) has weight 1.
        init_samples: latents kept (a uniform subsample per batch) for the
            self-initialisation; bounds its memory to ``init_samples x D`` floats.
        init_batches: training batches collected before the k-means runs (it runs
            earlier once ``init_samples`` latents are held).
        kmeans_iters: Lloyd iterations of the k-means.
        usage_window: training steps over which ``usage_window`` counts a code as used.
        backend: nearest-code search backend, see :func:`nearest_codes`.
        check_finite: see :class:`Quantizer`.

    Until a self-initialised codebook is ready, ``forward`` quantizes with the random
    initial codebook (so the first ``init_batches`` steps are warm-up).

    Example:
        >>> feats = torch.randn(5000, 96)
        >>> vq = ProjectedCodebookVQ(dim=16, codebook_size=1024, features=feats, kmeans_iters=2)
        >>> vq(torch.randn(2, 8, 8, 16)).codes.shape
        torch.Size([2, 8, 8])
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        features: Tensor | str | os.PathLike | None = None,
        feature_key: str | None = None,
        projector: Projector = "linear",
        hidden: int | None = None,
        metric: Metric = "l2",
        beta: float = 0.25,
        init_samples: int = 65536,
        init_batches: int = 8,
        kmeans_iters: int = 10,
        usage_window: int = 100,
        backend: Backend = "auto",
        check_finite: bool = True,
    ):
        super().__init__(dim, check_finite)
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        check_choice("metric", metric, ("l2", "cosine"))
        check_choice("projector", projector, ("linear", "mlp"))
        if features is None and init_samples < codebook_size:
            raise ValueError(f"init_samples={init_samples} must be >= codebook_size={codebook_size}")
        self._size, self.metric, self.beta, self.backend = codebook_size, metric, beta, backend
        self.init_samples, self.init_batches, self.kmeans_iters = init_samples, init_batches, kmeans_iters
        self.usage_window = usage_window

        if features is None:
            feats, ready = torch.randn(codebook_size, dim), False
        else:
            feats, ready = load_features(features, feature_key), True
            if feats.shape[0] < codebook_size:
                raise ValueError(f"{feats.shape[0]} feature rows cannot initialise {codebook_size} codes")
            if feats.shape[0] > codebook_size:
                feats, _ = kmeans(feats, codebook_size, kmeans_iters, metric, backend=backend)
        fdim = feats.shape[1]
        self.feature_dim = fdim
        self.register_buffer("features", feats.contiguous())  # frozen: never a parameter
        if projector == "linear":
            self.projector = nn.Linear(fdim, dim)
            if fdim == dim:
                nn.init.eye_(self.projector.weight)
                nn.init.zeros_(self.projector.bias)
        else:
            h = hidden or max(fdim, dim)
            self.projector = nn.Sequential(nn.Linear(fdim, h), nn.GELU(), nn.Linear(h, dim))
        self.register_buffer("initted", torch.tensor(ready))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_used", torch.full((codebook_size,), -(2**62), dtype=torch.int64))
        self._initted = ready  # host copy of the buffer: no sync per step
        self._pool: list[Tensor] = []
        self._pool_batches = 0

    @property
    def codebook_size(self) -> int:
        return self._size

    @property
    def codebook(self) -> Tensor:
        """The projected ``(K, D)`` fp32 codebook (differentiable w.r.t. the projector)."""
        with torch.autocast(device_type=self.features.device.type, enabled=False):
            c = self.projector(self.features.float())
        return l2norm(c) if self.metric == "cosine" else c

    # ------------------------------------------------------------------------------------
    def _forward(self, z: Tensor) -> QuantizerOutput:
        flat, lead = flatten_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            xf = flat.float()
            if self.metric == "cosine":
                xf = l2norm(xf)
            if self.training and not self._initted:
                self._collect(xf.detach())
            cb = self.codebook
            _, idx = nearest_codes(xf.detach(), cb.detach(), self.metric, self.backend)
            q = F.embedding(idx, cb)
            counts = code_histogram(idx, self._size)
            if self.training:
                with torch.no_grad():
                    self.step.add_(1)
                    self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))
            recent = (self.step - self.last_used) < self.usage_window
            metrics = {
                "perplexity": perplexity(counts),
                "usage_batch": (counts > 0).float().mean(),
                "usage_window": recent.float().mean(),
            }
            losses = {
                "codebook": F.mse_loss(q, xf.detach()),
                "commitment": self.beta * F.mse_loss(xf, q.detach()),
            }
            xq = straight_through(xf, q).to(flat.dtype).reshape(*lead, -1)
        return QuantizerOutput(xq.to(z.dtype), idx.reshape(lead), losses, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        return F.embedding(codes.long(), self.codebook)

    # -- self-initialisation from the model's own latents ---------------------------------
    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initted = bool(self.initted)  # one sync, at load time
        self._pool, self._pool_batches = [], 0

    @torch.no_grad()
    def _collect(self, x: Tensor) -> None:
        """Keep a uniform subsample of this batch (its share of ``init_samples``), then
        k-means the pool into the codebook once it is full or ``init_batches`` passed."""
        share = max(1, -(-self.init_samples // self.init_batches))
        held = sum(p.shape[0] for p in self._pool)
        take = min(share, self.init_samples - held, x.shape[0])
        self._pool.append(x[torch.randperm(x.shape[0], device=x.device)[:take]].clone())
        self._pool_batches += 1
        held += take
        if held < self.init_samples and self._pool_batches < self.init_batches:
            return
        pool = torch.cat(self._pool)
        self._pool, self._pool_batches = [], 0
        if pool.shape[0] < self._size:  # too few latents so far: keep collecting
            self._pool, self._pool_batches = [pool], 0
            return
        centres, _ = kmeans(pool, self._size, self.kmeans_iters, self.metric, reduce_over_ranks=True, backend=self.backend)
        self.features.copy_(centres)
        self.initted.fill_(True)
        self._initted = True
