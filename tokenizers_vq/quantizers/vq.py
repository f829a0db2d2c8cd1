"""Vector quantization with an EMA or learnable codebook.

van den Oord et al. 2017 (VQ-VAE) with the EMA codebook of Razavi et al. 2019,
k-means initialisation and dead-code restarts (Dhariwal et al. 2020, Jukebox),
factorised low-dimensional lookup with optional l2-normalisation (Yu et al. 2021,
ViT-VQGAN), the rotation-trick estimator (Fifty et al. 2024), noise substitution in training
(NSVQ, Vali and Baeckstroem 2022; DiVeQ, 2025), and as options: an
orthogonal codebook regulariser (Shin et al. 2023), a codebook-diversity (entropy) loss,
stochastic code sampling with a temperature (as in Takida et al. 2022, SQ-VAE) and the
affine re-parameterisation of the codebook to the latents' running statistics (Huh et al.
2023, "Straightening Out the Straight-Through Estimator").
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq import distributed as tdist
from tokenizers_vq.quantizers._fused import fused_commit, fused_update
from tokenizers_vq.quantizers._functional import (BACKENDS, ESTIMATORS, METRICS, Backend, Estimator, Metric,
                                                  code_histogram, code_statistics, estimate, l2norm, nearest_codes,
                                                  perplexity)
from tokenizers_vq.quantizers.base import (Quantizer, QuantizerOutput, as_weights, check_choice, check_float32_statistics,
                                           check_number, codebook_projections, flatten_latent, load_settings)

Learning = Literal["ema", "loss"]


class VectorQuantizer(Quantizer):
    """Nearest-codeword quantizer, ``(B, *S, D) -> codes (B, *S)``.

    Args:
        dim: latent size ``D``.
        codebook_size: number of codewords ``K``.
        codebook_dim: lookup size ``d``; when it differs from ``D`` the latent is projected
            ``D -> d`` before the search and back ``d -> D`` after (factorised codes).
        metric: ``"l2"`` or ``"cosine"`` (latent and codewords l2-normalised).
        learning: ``"ema"`` (codebook follows EMA cluster means; only the
            commitment loss is returned) or ``"loss"`` (codebook is a parameter
            trained by the codebook loss ``|sg(z) - q|^2``).
        decay: EMA decay of the cluster sizes, sums and usage statistics.
        eps: Laplace smoothing of the EMA cluster sizes.
        beta: weight of the commitment loss ``|z - sg(q)|^2``.
        kmeans_init: initialise the codebook by k-means on the first training batch (until then,
            an eval-mode call codes with the random initial codebook).
        kmeans_iters: Lloyd iterations of that k-means.
        kmeans_max_samples: latents per rank used by the k-means (bounds memory).
        dead_code_threshold: a code whose EMA count (assignments per step) falls
            below this is dead; counted in ``metrics`` and, with
            ``restart_dead_codes``, replaced by a current latent.
        restart_dead_codes: replace dead codes during training.
        estimator: ``"ste"`` (straight-through), ``"rotation"`` (rotation trick), or in training
            ``"nsvq"`` / ``"diveq"`` (noise substitution; :func:`~tokenizers_vq.quantizers._functional.estimate`).
        orthogonal_weight: weight of the orthogonal regulariser of the codebook (Shin et
            al. 2023): the mean squared off-identity of the cosine-similarity matrix of a
            random sample of ``orthogonal_sample`` codewords; ``learning="loss"`` only
            (an EMA codebook does not take gradients).
        orthogonal_sample: codewords per step in that sample (a fixed count: no host sync).
        diversity_weight: weight of the codebook-diversity loss ``1 - H(p) / log K``, with
            ``p`` the mean over ``diversity_sample`` random latents of their soft assignment
            ``softmax(-dist / diversity_temperature)``: it pushes the encoder (and a learned
            codebook) towards using every code. Training only.
        diversity_sample: latents per step in that mean (a fixed count: no host sync).
        diversity_temperature: temperature of those soft assignments (in distance units).
        sample_temperature: when > 0, training picks each code at random with probability
            ``softmax(-dist / sample_temperature)`` (Gumbel-max, in row chunks of bounded
            memory) instead of the nearest; evaluation and ``encode`` stay nearest.
        affine: re-parameterise the codebook as ``(e - mean(e)) / std(e) * s + m``, with
            ``m``, ``s`` the running mean and standard deviation of the latents per channel
            and ``mean(e)``, ``std(e)`` those of the stored codebook (running too, decay
            ``affine_decay``), so the codewords follow the latents' scale as the encoder
            drifts; ``learning="loss"`` and ``metric="l2"`` only.
        affine_decay: decay of those running statistics.
        backend: nearest-code search backend, see :func:`nearest_codes`.
        check_finite: see :class:`Quantizer`.

    Example:
        >>> vq = VectorQuantizer(dim=64, codebook_size=512)
        >>> out = vq(torch.randn(2, 8, 8, 64))
        >>> out.codes.shape, out.quantized.shape
        (torch.Size([2, 8, 8]), torch.Size([2, 8, 8, 64]))
    """

    exchanges = True  # statistics summed over ranks in a training step
    training_only_state = ("embed_sum",)  # see Tokenizer.save_pretrained(training_state=False)

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
        diversity_weight: float = 0.0,
        diversity_sample: int = 1024,
        diversity_temperature: float = 1.0,
        sample_temperature: float = 0.0,
        affine: bool = False,
        affine_decay: float = 0.99,
        backend: Backend = "auto",
        check_finite: bool = True,
    ):
        super().__init__(dim, check_finite)
        self._size, self.codebook_dim = codebook_size, (d := codebook_projections(self, codebook_size, codebook_dim))
        check_number("eps", eps, 0, open_low=True)
        for name, value, choices in (("metric", metric, METRICS), ("learning", learning, ("ema", "loss")),
                                     ("estimator", estimator, ESTIMATORS), ("backend", backend, BACKENDS)):
            check_choice(name, value, choices)
        if orthogonal_weight and learning != "loss":
            raise ValueError("orthogonal_weight regularises a learned codebook: set learning='loss' (an EMA codebook "
                             "takes no gradients)")
        if affine and (learning != "loss" or metric != "l2" or codebook_size < 2):
            raise ValueError("affine re-parameterises a learned l2 codebook of at least 2 codes: set learning='loss' "
                             "and metric='l2'")
        for name, value, low, high, whole in (  # each named when out of its range
                ("diversity_sample", diversity_sample, 1, math.inf, True), ("kmeans_iters", kmeans_iters, 0, math.inf, True),
                ("orthogonal_sample", orthogonal_sample, 1, math.inf, True), ("beta", beta, 0, math.inf, False),
                ("kmeans_max_samples", kmeans_max_samples, 1, math.inf, True), ("decay", decay, 0, 1, False),
                ("dead_code_threshold", dead_code_threshold, 0, math.inf, False), ("affine_decay", affine_decay, 0, 1, False),
                ("sample_temperature", sample_temperature, 0, math.inf, False),
                ("orthogonal_weight", orthogonal_weight, 0, math.inf, False), ("diversity_weight", diversity_weight, 0, math.inf, False)):
            check_number(name, value, low, high, integer=whole, open_high=high == 1)
        check_number("diversity_temperature", diversity_temperature, 0, open_low=True)
        self.orthogonal_weight, self.orthogonal_sample = orthogonal_weight, min(orthogonal_sample, codebook_size)
        self.diversity_weight, self.diversity_sample = diversity_weight, diversity_sample
        self.diversity_temperature, self.sample_temperature = diversity_temperature, sample_temperature
        self.affine, self.affine_decay, self.decay, self.eps, self.beta = affine, affine_decay, decay, eps, beta
        self.metric, self.learning, self.estimator, self.backend = metric, learning, estimator, backend
        self.kmeans_init, self.kmeans_iters, self.kmeans_max_samples = kmeans_init, kmeans_iters, kmeans_max_samples
        self.dead_code_threshold, self.restart_dead_codes = dead_code_threshold, restart_dead_codes
        self.register_buffer("_metric", torch.tensor(METRICS.index(metric)))  # the codes' meaning: kept, checked at load
        embed = torch.randn(codebook_size, d)
        embed = l2norm(embed) if metric == "cosine" else embed
        if learning == "loss":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_sum", embed.clone())
        # EMA of assignments per step, in both learning modes (usage, dead codes).
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64))
        if affine:  # running per-channel statistics of the latents and of the stored codebook
            self.register_buffer("latent_mean", torch.zeros(d))
            self.register_buffer("latent_var", torch.ones(d))
            self.register_buffer("embed_mean", embed.mean(0))
            self.register_buffer("embed_std", embed.std(0))
        self._initted = not kmeans_init  # host copy of the buffer: no sync per step

    @property
    def codebook_size(self) -> int:
        return self._size

    @property
    def codebook(self) -> Tensor:
        """The effective ``(K, d)`` fp32 codebook (unit rows for ``cosine``)."""
        c = self.embed.float()
        if self.affine:
            c = (c - self.embed_mean) / (self.embed_std + 1e-5) * (self.latent_var + 1e-5).sqrt() + self.latent_mean
        return l2norm(c) if self.metric == "cosine" else c

    def _raw(self, c: Tensor) -> Tensor:
        """Stored rows whose effective codewords are ``c`` (the inverse of the affine map), for
        dead-code restarts: the map's statistics are running buffers (a restart moves no other code)."""
        if not self.affine:
            return c
        return (c - self.latent_mean) / (self.latent_var + 1e-5).sqrt() * (self.embed_std + 1e-5) + self.embed_mean

    def _rows(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """``(flat, xf, lead)``: the projected latent's rows (under the caller's autocast), the
        same rows in fp32 as the search sees them (unit rows for ``cosine``), the leading shape."""
        flat, lead = flatten_latent(self.project_in(z))
        with torch.autocast(device_type=z.device.type, enabled=False):
            xf = flat.float()
            return flat, (l2norm(xf) if self.metric == "cosine" else xf), lead

    def _forward(self, z: Tensor, pool: list | None = None) -> QuantizerOutput:
        # pool: a caller that quantizes several maps per step with this codebook (the
        # multi-scale quantizer) gets each call's (rows, counts, sums) there and updates once
        check_float32_statistics(self, self.cluster_size)
        flat, xf, lead = self._rows(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            if self.training and not self._initted:
                self._kmeans(xf.detach())
            if self.training and self.affine:
                with torch.no_grad():
                    e, w = self.embed.float(), 1 - self.affine_decay
                    mean, var, ok = self._latent_moments(xf)
                    self.latent_mean.lerp_(torch.where(ok, mean, self.latent_mean), w)
                    self.latent_var.lerp_(torch.where(ok, var, self.latent_var), w)
                    self.embed_mean.lerp_(torch.where(ok, e.mean(0), self.embed_mean), w)
                    self.embed_std.lerp_(torch.where(ok, e.std(0), self.embed_std), w)
            cb = self.codebook
            if self.training and self.sample_temperature > 0:
                idx = self._sample_codes(xf.detach(), cb.detach())
            else:
                _, idx = nearest_codes(xf.detach(), cb.detach(), self.metric, self.backend)
            fast = fused_commit(self, xf, cb, idx)  # (q with the straight-through gradient, commitment) or None
            q = fast[0] if fast else F.embedding(idx, cb)
            if self.training and self.learning == "ema":
                counts, sums = code_statistics(xf.detach(), idx, self._size)
            else:
                counts, sums = code_histogram(idx, self._size), None
            losses = {"commitment": fast[1] if fast else self.beta * F.mse_loss(xf, q.detach())}
            if self.learning == "loss":
                losses["codebook"] = F.mse_loss(q, xf.detach())
            if self.training and (self.orthogonal_weight or self.diversity_weight):
                reg = cb.clone()  # the update below writes the stored codebook in place
                if self.orthogonal_weight:
                    sample = l2norm(reg[torch.randperm(self._size, device=cb.device)[: self.orthogonal_sample]])
                    eye = torch.eye(sample.shape[0], device=cb.device)
                    losses["orthogonal"] = self.orthogonal_weight * (sample @ sample.T - eye).square().mean()
                if self.diversity_weight:
                    losses["diversity"] = self.diversity_weight * self._diversity(xf, reg)
            fused = self.training and pool is None and fused_update(self, xf.detach(), counts, sums)
            metrics = fused or self._metrics(counts)
            if self.training and pool is not None:
                pool.append((xf.detach(), counts, sums))
            elif self.training and not fused:  # (the fused kernels updated it)
                self._update(xf.detach(), counts, sums, metrics)
            xq = (q if fast else estimate(self.estimator, xf, q, self.training)).to(flat.dtype).reshape(*lead, -1)
        quantized = self.project_out(xq).to(z.dtype)
        return QuantizerOutput(quantized, idx.reshape(lead), losses, metrics)

    def _latent_moments(self, xf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-channel mean of the rows and their mean square about the running mean, over every
        rank (one all-reduce), and whether all ranks' rows and those moments were finite (else the
        affine statistics stay as they are). About the running mean, not their own: a step's own
        variance leaves out how its mean moves, and is 0 for one row (a codebook mapped to it shrinks to a point)."""
        dev, d = xf - self.latent_mean, xf.shape[1]
        stats = torch.cat([dev.sum(0), dev.square().sum(0), xf.new_tensor([xf.shape[0]]),
                           (~torch.isfinite(xf).all()).float().reshape(1)])
        stats = tdist.all_reduce_sum_(stats) if tdist.is_distributed() else stats
        mean, var, ok = self.latent_mean + stats[:d] / stats[2 * d], stats[d : 2 * d] / stats[2 * d], stats[2 * d + 1] == 0
        return mean, var, ok & torch.isfinite(mean).all() & torch.isfinite(var).all()

    def _codes(self, z: Tensor) -> Tensor:
        _, xf, lead = self._rows(z)  # the search of _forward in eval, and nothing else
        with torch.autocast(device_type=z.device.type, enabled=False):
            _, idx = nearest_codes(xf, self.codebook, self.metric, self.backend)
        return idx.reshape(lead)

    def _decode(self, codes: Tensor) -> Tensor:
        return self._project_out(F.embedding(codes.long(), self.codebook))

    @torch.no_grad()
    def candidates(self, z: Tensor, k: int) -> Tensor:
        """The ``k`` nearest codes of latent rows ``z (n, D)``, nearest first, ``(n, k)``: a shortlist
        by the expanded distance, ranked by elementwise sums (ties to the lower index in any batch)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self._size or z.shape[1:] != (self.dim,):
            raise ValueError(f"candidates takes latent rows (n, {self.dim}) and k from 1 to the codebook size "
                             f"{self._size}, got shape {tuple(z.shape)} and k={k!r}")
        with torch.autocast(device_type=z.device.type, enabled=False):  # fp32 distances under any autocast
            x = self.project_in(as_weights(self.project_in, z.float())).float()  # (half-precision projections too)
            x = l2norm(x) if self.metric == "cosine" else x
            cb, out, m = self.codebook, [], min(self._size, k + 8)
            for chunk in x.split(max(1, min((1 << 24) // self._size, (1 << 24) // (m * cb.shape[1])))):
                short = torch.sort(self._distances(chunk, cb), dim=1, stable=True).indices[:, :m].sort(dim=1).values
                rows, codes = chunk[:, None, :], cb[short]
                exact = (rows - codes).square().sum(-1) if self.metric == "l2" else 1 - (rows * codes).sum(-1)
                out.append(short.gather(1, torch.sort(exact, dim=1, stable=True).indices[:, :k]))
        return torch.cat(out) if out else x.new_zeros(0, k, dtype=torch.long)

    def _distances(self, x: Tensor, cb: Tensor) -> Tensor:
        """``(n, K)`` fp32 distances of the metric (squared l2, or ``1 - cos`` on unit rows); l2
        about the codebook's mean, so that latents far from the origin keep their digits."""
        if self.metric == "cosine":
            return 1 - x @ cb.T
        x, cb = x - (centre := cb.mean(0)), cb - centre
        return (x.square().sum(1, keepdim=True) - 2 * x @ cb.T + cb.square().sum(1)).clamp_min(0)

    def _sample_codes(self, x: Tensor, cb: Tensor) -> Tensor:
        """Codes drawn from ``softmax(-dist / sample_temperature)`` by Gumbel-max (``argmax(-dist
        + T g)``: no overflow at any temperature), in row chunks of at most 2^24 distances."""
        rows, out = max(1, (1 << 24) // self._size), []
        for chunk in x.split(rows):
            dist = self._distances(chunk, cb)
            u = torch.rand_like(dist).clamp_(1e-20, 1.0)
            out.append((-dist - self.sample_temperature * torch.log(-torch.log(u))).argmax(1))
        return torch.cat(out) if out else x.new_zeros(0, dtype=torch.long)

    def _diversity(self, x: Tensor, cb: Tensor) -> Tensor:
        """``1 - H(p) / log K`` of the mean soft assignment of a random sample of rows."""
        pick = torch.randint(0, max(1, x.shape[0]), (self.diversity_sample,), device=x.device)
        dist = self._distances(x[pick], cb)
        p = torch.softmax(-(dist - dist.min(1, keepdim=True).values) / self.diversity_temperature, dim=1).mean(0)
        entropy = -(p * p.clamp_min(1e-12).log()).sum()
        return 1 - entropy / math.log(max(self._size, 2))

    # -- codebook learning ----------------------------------------------------------------
    @torch.no_grad()
    def _update(self, x: Tensor, counts: Tensor, sums: Tensor | None, metrics: dict[str, Tensor]) -> None:
        """EMA statistics (summed over ranks) then dead-code restarts, in that order so that a restarted code is
        not overwritten by the same step's EMA update (on CUDA in two launches: ``_fused.fused_update``). A step whose
        rows (any rank's) hold Inf or NaN (a half-precision projection's overflow, or one the finiteness check did not
        see under ``torch.compile``) leaves the statistics and codebook as they were (``metrics["skipped"]``)."""
        k = self._size
        if sums is not None:
            g_counts, g_sums = counts, sums
            if tdist.is_distributed():  # one all-reduce for both
                stats = tdist.all_reduce_sum_(torch.cat([counts.unsqueeze(1), sums], dim=1))
                g_counts, g_sums = stats[:, 0], stats[:, 1:]
            ok = torch.isfinite(g_sums).all()  # the same on every rank
            self.cluster_size.lerp_(torch.where(ok, g_counts, self.cluster_size), 1 - self.decay)
            self.embed_sum.lerp_(torch.where(ok, g_sums, self.embed_sum), 1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
            embed = self.embed_sum / smoothed.unsqueeze(1)
            self.embed.copy_(torch.where(ok, l2norm(embed) if self.metric == "cosine" else embed, self.embed))
        else:
            bad = (~torch.isfinite(x).all()).float().unsqueeze(0)
            g_counts = tdist.all_reduce_sum_(torch.cat([counts, bad]))
            ok = g_counts[-1] == 0
            self.cluster_size.lerp_(torch.where(ok, g_counts[:-1], self.cluster_size), 1 - self.decay)
        metrics["skipped"] = (~ok).float()
        if self.restart_dead_codes and self.dead_code_threshold > 0:
            metrics["restarted"] = self._restart(x, ok)

    @torch.no_grad()
    def _restart(self, x: Tensor, ok: Tensor) -> Tensor:
        """Replace codes whose EMA count is under the threshold by latents of the batch, distinct
        ones while there are enough (drawn on rank 0, identical everywhere; none where ``ok`` is false). Restarted
        codes get an EMA count of twice the threshold: about ln(2)/(1-decay) steps of grace."""
        dead = ((self.cluster_size < self.dead_code_threshold) & ok).unsqueeze(1)
        fresh = tdist.sample_rows(x, self._size, slots=dead.cumsum(0).squeeze(1) - 1)  # dead codes: distinct rows
        self.embed.data.copy_(torch.where(dead, self._raw(fresh).to(self.embed.dtype), self.embed.data))
        reset = 2.0 * self.dead_code_threshold
        if self.learning == "ema":
            self.embed_sum.copy_(torch.where(dead, fresh * reset, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead.squeeze(1), torch.full_like(self.cluster_size, reset), self.cluster_size))
        self.restarts.add_(n_dead := dead.sum())
        return n_dead.float()

    def _metrics(self, counts: Tensor) -> dict[str, Tensor]:
        dead = self.cluster_size < self.dead_code_threshold
        return {"perplexity": perplexity(counts), "usage_batch": (counts > 0).float().mean(),
                "usage_window": 1.0 - dead.float().mean(), "dead_codes": dead.sum().float()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_settings(self, state_dict, prefix, {"_metric": METRICS})
        sums, embed, size = (prefix + k for k in ("embed_sum", "embed", "cluster_size"))
        if self.learning == "ema" and sums not in state_dict and embed in state_dict and size in state_dict:
            n = state_dict[size].float().sum()  # a file saved without training state: the sums its codebook came from
            state_dict[sums] = state_dict[embed] * ((state_dict[size] + self.eps) / (n + self._size * self.eps) * n)[:, None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted = bool(self.initted)  # one sync, at load time

    @torch.no_grad()
    def _kmeans(self, x: Tensor) -> None:
        """Lloyd's k-means over at most ``kmeans_max_samples`` latents per rank; sums
        and counts are reduced over ranks so every rank gets the same centres.

        Not ``quantizers.kmeans.kmeans``: this one runs inside the first training
        forward, so it has no data-dependent branch or host sync (``torch.compile``
        with ``fullgraph=True`` traces it) and accepts fewer latents than codes (distinct
        seeds while there are enough, then each row at most ``ceil(K / N)`` times). An empty centre keeps its seed; dead-code restarts
        deal with it afterwards. A batch with Inf or NaN rows on any rank changes nothing
        (the codebook keeps its random init)."""
        x = x[: self.kmeans_max_samples]
        finite = torch.isfinite(x).all(1, keepdim=True)  # a batch with Inf/NaN rows (on any rank) inits nothing
        ok = tdist.all_reduce_sum_((~finite).any().float().reshape(1))[0] == 0
        x = torch.where(finite, x, torch.zeros_like(x))
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
        self.embed.data.copy_(torch.where(ok, centres, self.embed.data))
        if self.affine:  # statistics under which the effective codebook is the centres
            for buf, value in ((self.latent_mean, centres.mean(0)), (self.latent_var, centres.var(0)),
                               (self.embed_mean, centres.mean(0)), (self.embed_std, centres.std(0))):
                buf.copy_(torch.where(ok, value, buf))
        self.cluster_size.copy_(torch.where(ok, counts, self.cluster_size))
        if self.learning == "ema":
            self.embed_sum.copy_(torch.where(ok, centres * counts.unsqueeze(1), self.embed_sum))
        self.initted.fill_(True)  # (a skipped init leaves the random codebook, restarts then fill it: not retried,
        self._initted = True  # a resumed run included)
