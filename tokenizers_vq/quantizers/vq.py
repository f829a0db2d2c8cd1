"""Vector quantization with an EMA or learnable codebook.

van den Oord et al. 2017 (VQ-VAE) with the EMA codebook of Razavi et al. 2019,
k-means initialisation and dead-code restarts (Dhariwal et al. 2020, Jukebox),
factorised low-dimensional lookup with optional l2-normalisation (Yu et al. 2021,
ViT-VQGAN) and the rotation-trick estimator (Fifty et al. 2024).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq import distributed as tdist
from tokenizers_vq.quantizers._functional import (
    Backend,
    Metric,
    code_histogram,
    code_statistics,
    l2norm,
    nearest_codes,
    perplexity,
    rotation_trick,
    straight_through,
)
from tokenizers_vq.quantizers.base import Quantizer, QuantizerOutput, check_choice, flatten_latent

Estimator = Literal["ste", "rotation"]
Learning = Literal["ema", "loss"]


class VectorQuantizer(Quantizer):
    """Nearest-codeword quantizer, ``(B, *S, D) -> codes (B, *S)``.

    Args:
        dim: latent size ``D``.
        codebook_size: number of codewords ``K``.
        codebook_dim: lookup size ``d``; when it differs from ``D`` the latent is
            projected ``D -> d`` before the search and back ``d -> D`` after
            (factorised codes).
        metric: ``"l2"`` or ``"cosine"`` (latent and codewords l2-normalised).
        learning: ``"ema"`` (codebook follows EMA cluster means; only the
            commitment loss is returned) or ``"loss"`` (codebook is a parameter
            trained by the codebook loss ``|sg(z) - q|^2``).
        decay: EMA decay of the cluster sizes, sums and usage statistics.
        eps: Laplace smoothing of the EMA cluster sizes.
        beta: weight of the commitment loss ``|z - sg(q)|^2``.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that k-means.
        kmeans_max_samples: latents per rank used by the k-means (bounds memory).
        dead_code_threshold: a code whose EMA count (assignments per step) falls
            below this is dead; counted in ``metrics`` and, with
            ``restart_dead_codes``, replaced by a current latent.
        restart_dead_codes: replace dead codes during training.
        estimator: ``"ste"`` (straight-through) or ``"rotation"`` (rotation trick).
        orthogonal_weight: weight of the orthogonal regulariser of the codebook (Shin et
            al. 2023): the mean squared off-identity of the cosine-similarity matrix of a
            random sample of ``orthogonal_sample`` codewords; ``learning="loss"`` only
            (an EMA codebook does not take gradients).
        orthogonal_sample: codewords per step in that sample (a fixed count: no host sync).
        backend: nearest-code search backend, see :func:`nearest_codes`.
        check_finite: see :class:`Quantizer`.

    Example:
        >>> vq = VectorQuantizer(dim=64, codebook_size=512)
        >>> out = vq(torch.randn(2, 8, 8, 64))
        >>> out.codes.shape, out.quantized.shape
        (torch.Size([2, 8, 8]), torch.Size([2, 8, 8, 64]))
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        metric: Metric = "l2",
        learning: Learning = "ema",
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_max_samples: int = 65536,
        dead_code_threshold: float = 1.0,
        restart_dead_codes: bool = True,
        estimator: Estimator = "ste",
        orthogonal_weight: float = 0.0,
        orthogonal_sample: int = 256,
        backend: Backend = "auto",
        check_finite: bool = True,
    ):
        super().__init__(dim, check_finite)
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        check_choice("metric", metric, ("l2", "cosine"))
        check_choice("learning", learning, ("ema", "loss"))
        check_choice("estimator", estimator, ("ste", "rotation"))
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if orthogonal_weight and learning != "loss":
            raise ValueError("orthogonal_weight regularises a learned codebook: set learning='loss' (an EMA codebook "
                             "takes no gradients)")
        self.orthogonal_weight, self.orthogonal_sample = orthogonal_weight, min(orthogonal_sample, codebook_size)
        d = codebook_dim or dim
        self._size, self.codebook_dim = codebook_size, d
        self.metric, self.learning, self.estimator, self.backend = metric, learning, estimator, backend
        self.decay, self.eps, self.beta = decay, eps, beta
        self.kmeans_init, self.kmeans_iters, self.kmeans_max_samples = kmeans_init, kmeans_iters, kmeans_max_samples
        self.dead_code_threshold, self.restart_dead_codes = dead_code_threshold, restart_dead_codes

        self.project_in = nn.Linear(dim, d) if d != dim else nn.Identity()
        self.project_out = nn.Linear(d, dim) if d != dim else nn.Identity()

        embed = torch.randn(codebook_size, d)
        if metric == "cosine":
            embed = l2norm(embed)
        if learning == "loss":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_sum", embed.clone())
        # EMA of assignments per step, in both learning modes (usage, dead codes).
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))
        self._initted = not kmeans_init  # host copy of the buffer: no sync per step

    @property
    def codebook_size(self) -> int:
        return self._size

    @property
    def codebook(self) -> Tensor:
        """The effective ``(K, d)`` fp32 codebook (unit rows for ``cosine``)."""
        c = self.embed.float()
        return l2norm(c) if self.metric == "cosine" else c

    # ------------------------------------------------------------------------------------
    def _forward(self, z: Tensor) -> QuantizerOutput:
        x = self.project_in(z)
        flat, lead = flatten_latent(x)
        with torch.autocast(device_type=z.device.type, enabled=False):
            xf = flat.float()
            if self.metric == "cosine":
                xf = l2norm(xf)
            if self.training and not self._initted:
                self._kmeans(xf.detach())
            cb = self.codebook
            _, idx = nearest_codes(xf.detach(), cb.detach(), self.metric, self.backend)
            q = F.embedding(idx, cb)
            if self.training and self.learning == "ema":
                counts, sums = code_statistics(xf.detach(), idx, self._size)
            else:
                counts, sums = code_histogram(idx, self._size), None
            metrics = self._metrics(counts)
            if self.training:
                self._update(xf.detach(), counts, sums, metrics)
            losses = {"commitment": self.beta * F.mse_loss(xf, q.detach())}
            if self.learning == "loss":
                losses["codebook"] = F.mse_loss(q, xf.detach())
            if self.training and self.orthogonal_weight:
                sample = l2norm(cb[torch.randperm(self._size, device=cb.device)[: self.orthogonal_sample]])
                eye = torch.eye(sample.shape[0], device=cb.device)
                losses["orthogonal"] = self.orthogonal_weight * (sample @ sample.T - eye).square().mean()
            estimate = rotation_trick if self.estimator == "rotation" else straight_through
            xq = estimate(xf, q).to(flat.dtype).reshape(*lead, -1)
        quantized = self.project_out(xq).to(z.dtype)
        return QuantizerOutput(quantized, idx.reshape(lead), losses, metrics)

    def _decode(self, codes: Tensor) -> Tensor:
        return self.project_out(F.embedding(codes.long(), self.codebook))

    # -- codebook learning ----------------------------------------------------------------
    @torch.no_grad()
    def _update(self, x: Tensor, counts: Tensor, sums: Tensor | None, metrics: dict[str, Tensor]) -> None:
        """EMA statistics (summed over ranks) then dead-code restarts, in that order so
        that a restarted code is not overwritten by the same step's EMA update."""
        k = self._size
        if sums is not None:
            stats = tdist.all_reduce_sum_(torch.cat([counts.unsqueeze(1), sums], dim=1))
            g_counts, g_sums = stats[:, 0], stats[:, 1:]
            self.cluster_size.lerp_(g_counts, 1 - self.decay)
            self.embed_sum.lerp_(g_sums, 1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
            embed = self.embed_sum / smoothed.unsqueeze(1)
            self.embed.copy_(l2norm(embed) if self.metric == "cosine" else embed)
        else:
            g_counts = tdist.all_reduce_sum_(counts.clone())
            self.cluster_size.lerp_(g_counts, 1 - self.decay)
        if self.restart_dead_codes and self.dead_code_threshold > 0:
            metrics["restarted"] = self._restart(x)

    @torch.no_grad()
    def _restart(self, x: Tensor) -> Tensor:
        """Replace codes whose EMA count is under the threshold by latents of the
        batch (drawn on rank 0, identical everywhere). Restarted codes get an EMA
        count of twice the threshold: about ln(2)/(1-decay) steps of grace."""
        dead = (self.cluster_size < self.dead_code_threshold).unsqueeze(1)
        fresh = tdist.sample_rows(x, self._size)
        self.embed.data.copy_(torch.where(dead, fresh.to(self.embed.dtype), self.embed.data))
        reset = 2.0 * self.dead_code_threshold
        if self.learning == "ema":
            self.embed_sum.copy_(torch.where(dead, fresh * reset, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead.squeeze(1), torch.full_like(self.cluster_size, reset), self.cluster_size))
        n_dead = dead.sum()
        self.restarts.add_(n_dead)
        return n_dead.float()

    def _metrics(self, counts: Tensor) -> dict[str, Tensor]:
        dead = self.cluster_size < self.dead_code_threshold
        return {
            "perplexity": perplexity(counts),
            "usage_batch": (counts > 0).float().mean(),
            "usage_window": 1.0 - dead.float().mean(),
            "dead_codes": dead.sum().float(),
        }

    # -- k-means initialisation ---------------------------------------------------------
    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initted = bool(self.initted)  # one sync, at load time

    @torch.no_grad()
    def _kmeans(self, x: Tensor) -> None:
        """Lloyd's k-means over at most ``kmeans_max_samples`` latents per rank; sums
        and counts are reduced over ranks so every rank gets the same centres.

        Not ``quantizers.kmeans.kmeans``: this one runs inside the first training
        forward, so it has no data-dependent branch or host sync (``torch.compile``
        with ``fullgraph=True`` traces it) and accepts fewer latents than codes (seeds
        drawn with replacement). An empty centre keeps its seed; dead-code restarts
        deal with it afterwards."""
        x = x[: self.kmeans_max_samples]
        centres = tdist.sample_rows(x, self._size)
        counts = torch.zeros(self._size, device=x.device)
        for _ in range(self.kmeans_iters):
            _, idx = nearest_codes(x, centres, self.metric, self.backend)
            counts, sums = code_statistics(x, idx, self._size)
            stats = tdist.all_reduce_sum_(torch.cat([counts.unsqueeze(1), sums], 1))
            counts, sums = stats[:, 0], stats[:, 1:]
            means = sums / counts.clamp_min(1.0).unsqueeze(1)
            if self.metric == "cosine":
                means = l2norm(means)
            centres = torch.where(counts.unsqueeze(1) > 0, means, centres)
        self.embed.data.copy_(centres)
        self.cluster_size.copy_(counts)
        if self.learning == "ema":
            self.embed_sum.copy_(centres * counts.unsqueeze(1))
        self.initted.fill_(True)
        self._initted = True
