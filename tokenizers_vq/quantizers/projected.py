"""Large frozen codebook behind a trainable projector (Zhu et al. 2024, VQGAN-LC:
"Scaling the Codebook Size of VQGAN to 100,000 with a Utilization Rate of 99%").

The codebook is a frozen ``(K, F)`` buffer of features (k-means centres of
pretrained features in the paper); only a projector ``F -> D`` is trained. Every
step projects the *whole* codebook, so every code moves with the projector whether
or not it was chosen, which is what keeps utilisation near 100% at large ``K``.

Where the projector starts matters as much. Its codebook loss has many local
minima of nearly equal distortion and very different usage: on frozen latents
that are a known linear map of 4x4 photo patches, with the features the k-means
(K=4096) of those patches, the paper's training from a random projector settles
far from that map and, seed by seed, uses 57-84% of the codes on held-out
photos, where the map itself uses 88%. (In the paper the encoder trains too and
can move its latents towards the codebook; frozen latents cannot.) So by default a
linear projector is first registered onto the latents of the first training
batches (:func:`fit_linear_projector`: 86-90% before any gradient step, 87-89%
after 300-2000 steps of the paper's training at lr 1e-3), which then continues.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vq import distributed as tdist
from tokenizers_vq.quantizers._functional import (BACKENDS, METRICS, Backend, Metric, code_histogram, l2norm,
                                                  nearest_codes, perplexity, straight_through)
from tokenizers_vq.quantizers.base import (MAX_LATENT_MAGNITUDE, Quantizer, QuantizerOutput, as_weights, check_choice,
                                           check_number, flatten_latent, load_settings)
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
        from safetensors import SafetensorError  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            tensors = load_file(os.fspath(features))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"codebook features {features}: not a readable safetensors file ({e}); save the (N, F) "
                             "feature matrix with safetensors.torch.save_file") from e
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
    t, peak = t.detach().float(), float(t.abs().max())
    if peak > MAX_LATENT_MAGNITUDE:  # their squared sums (the projector fit's covariance) overflow float32
        raise ValueError(f"codebook features have values of magnitude {peak:.3g}, over the limit of "
                         f"{MAX_LATENT_MAGNITUDE:.0e}: scale them down (the projector is fitted to the latents' scale)")
    return t


def _check_spread(t: Tensor) -> None:
    """Refuse features all alike (the projector fit divides by their spread)."""
    lo, hi = t.aminmax(dim=0)
    if float((hi - lo).max()) <= 1e-6 * float(t.abs().max()):
        raise ValueError("codebook features have no spread (every row is the same vector, up to float32 rounding): "
                         "pass features with distinct rows, or features=None to learn the codebook from the latents")


def _principal_axes(x: Tensor, reduce_over_ranks: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean ``(d,)``, variances ``(d,)`` (descending) and axes ``(d, d)`` (columns) of
    the rows of ``x``, and the sign of the third moment along each axis."""
    stats = torch.cat([x.new_full((1,), x.shape[0]), x.sum(0)])
    if reduce_over_ranks:
        stats = tdist.all_reduce_sum_(stats)
    n, mean = stats[0], stats[1:] / stats[0]
    cov = (x - mean).T @ (x - mean)  # about the mean: features far from the origin keep their spread's digits
    if reduce_over_ranks:
        cov = tdist.all_reduce_sum_(cov)
    cov = cov / n
    var, axes = torch.linalg.eigh((cov + cov.T) / 2)
    var, axes = var.flip(0).clamp_min(0), axes.flip(1)
    third = ((x - mean) @ axes).pow(3).sum(0)
    if reduce_over_ranks:
        third = tdist.all_reduce_sum_(third)
    return mean, var, axes, torch.where(third >= 0, 1.0, -1.0)


def _soft_statistics(z: Tensor, codebook: Tensor, var: float, block_elems: int = 2**22) -> Tensor:
    """``(K, 1 + D)``: per code, the summed responsibilities ``softmax(-|z - c|^2 / 2 var)``
    over the rows of ``z`` and the responsibility-weighted sum of those rows."""
    stats = z.new_zeros(codebook.shape[0], 1 + z.shape[1])
    half_sq = codebook.pow(2).sum(1) / 2
    rows = max(1, block_elems // codebook.shape[0])
    for i in range(0, z.shape[0], rows):
        zb = z[i : i + rows]
        r = torch.softmax((zb @ codebook.T - half_sq) / var, dim=1)
        stats[:, 0] += r.sum(0)
        stats[:, 1:] += r.T @ zb
    return stats


@torch.no_grad()
def fit_linear_projector(
    features: Tensor,
    latents: Tensor,
    starts: int = 4,
    iters: int = 20,
    max_codes: int | None = None,
    max_latents: int | None = None,
    reduce_over_ranks: bool = False,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor] | None:
    """Affine map with ``features @ W.T + b`` spread like ``latents``, found without
    knowing which latent belongs to which feature.

    The projected features are the means of an equal-weight Gaussian mixture that is
    fitted to the latents by EM, as in affine Coherent Point Drift (Myronenko & Song
    2010): soft assignments, then weighted least squares for ``(W, b)``. The shared
    variance follows a deterministic-annealing schedule (Rose 1998) instead of its
    ML estimate: from the latents' variance down 1000x, so the first iterations see
    only the coarse shape of the cloud and the last ones are nearest-code (ICP)
    steps. This avoids most of the local minima that the hard nearest-code loss
    settles in from a random map. Each start pairs the top principal axes of the
    features with those of the latents (matching means and variances), with signs
    from the third moments (start 0) or random (the others); the start whose map has
    the lowest nearest-code distortion over the full codebook wins.

    Args:
        features: ``(K, F)`` codebook features, identical on every rank.
        latents: ``(N, D)`` latents of this rank.
        starts: number of sign patterns tried (>= 1).
        iters: EM iterations per start.
        max_codes: features subsampled for the EM (the map has only ``(F + 1) D``
            numbers). Default ``min(K / 4, 16384)``, raised to ``max(1024, 8 (F + 1))``:
            at ``K = 100,000`` a 1024-code subset registered the map
            too coarsely (held-out usage 81.5%), 16384 codes matched the true map
            (89.3%, 2.8 s on an H100).
        max_latents: latents subsampled per rank; default ``4 max_codes``.
        reduce_over_ranks: sum the statistics over ``torch.distributed`` ranks.
        backend: nearest-code search backend of the final scoring.

    Returns:
        ``(W, b)`` as ``(D, F)`` and ``(D,)`` fp32, or ``None`` when the latents
        have no spread to fit to or no start gives a finite map.
    """
    gen = torch.Generator().manual_seed(0)  # same subset and signs on every rank
    dev = latents.device
    max_codes = max_codes or max(min(features.shape[0] // 4, 16384), 1024, 8 * (features.shape[1] + 1))
    max_latents = max_latents or 4 * max_codes
    f = features[torch.randperm(features.shape[0], generator=gen)[:max_codes].to(dev)].float()
    z = latents[torch.randperm(latents.shape[0])[:max_latents].to(dev)].float()
    mf, vf, uf, skew_f = _principal_axes(f, reduce_over_ranks=False)
    mz, vz, uz, skew_z = _principal_axes(z, reduce_over_ranks)
    v0 = float(vz.mean())
    if not math.isfinite(v0) or v0 <= 1e-12 * max(1.0, float(mz.abs().max()) ** 2):
        return None
    r = min(f.shape[1], z.shape[1])
    gain = (vz[:r] / vf[:r].clamp_min(1e-6 * float(vf[0]))).sqrt() * skew_f[:r] * skew_z[:r]
    f1 = torch.cat([f, torch.ones(f.shape[0], 1, device=dev)], 1)  # affine: bias as a column
    best: tuple[float, Tensor, Tensor] | None = None
    for s in range(max(1, starts)):
        signs = torch.ones(r) if s == 0 else torch.randint(0, 2, (r,), generator=gen) * 2.0 - 1
        w = uz[:, :r] @ torch.diag(gain * signs.to(dev)) @ uf[:, :r].T
        b = mz - w @ mf
        for i in range(iters):
            var = v0 * 1e-3 ** (i / max(1, iters - 1))
            stats = _soft_statistics(z, f @ w.T + b, var)
            if reduce_over_ranks:
                stats = tdist.all_reduce_sum_(stats)
            a = f1.T @ (f1 * stats[:, :1])
            a = a + 1e-6 * a.diagonal().mean() * torch.eye(a.shape[0], device=dev)
            sol = torch.linalg.solve(a, f1.T @ stats[:, 1:])
            w, b = sol[:-1].T, sol[-1]
        dist, _ = nearest_codes(z, features.float() @ w.T + b, "l2", backend)
        err = torch.stack([dist.sum(), dist.new_tensor(dist.shape[0])])
        if reduce_over_ranks:
            err = tdist.all_reduce_sum_(err)
        err = float(err[0] / err[1])
        finite = math.isfinite(err) and bool(torch.isfinite(torch.cat([w.flatten(), b])).all())
        if finite and (best is None or err < best[0]):
            best = (err, w.contiguous(), b.contiguous())
    return None if best is None else best[1:]


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
        fit_projector: with ``features`` given and a linear projector, register the
            projector onto the latents of the first training batches (pooled as for
            the self-initialisation, see ``init_samples``/``init_batches``) with
            :func:`fit_linear_projector` before training moves it. Ignored for the
            MLP projector and for the self-initialised codebook (whose identity
            projector is already exact).
        hidden: width of the MLP projector (default ``max(F, D)``).
        metric: ``"l2"`` or ``"cosine"``.
        beta: weight of the commitment loss ``|z - sg(q)|^2``; the codebook loss
            ``|sg(z) - q|^2`` (which trains the projector) has weight 1.
        init_samples: latents kept (a uniform subsample per batch) for the
            self-initialisation or the projector fit; bounds their memory to
            ``init_samples x D`` floats.
        init_batches: training batches collected before the k-means or the fit runs
            (it runs earlier once ``init_samples`` latents are held).
        kmeans_iters: Lloyd iterations of the k-means.
        kmeans_balance: re-seed k-means clusters smaller than this fraction of the mean
            size at points of big ones (``balance`` of :func:`kmeans`); ``0``: plain.
        usage_window: training steps over which ``usage_window`` counts a code as used.
        backend: nearest-code search backend, see :func:`nearest_codes`.
        check_finite: see :class:`Quantizer`.

    Until a self-initialised codebook or a fitted projector is ready, ``forward``
    quantizes with the initial one (so the first ``init_batches`` steps are warm-up).

    Example:
        >>> feats = torch.randn(5000, 96)
        >>> vq = ProjectedCodebookVQ(dim=16, codebook_size=1024, features=feats, kmeans_iters=2)
        >>> vq(torch.randn(2, 8, 8, 16)).codes.shape
        torch.Size([2, 8, 8])
    """

    exchanges = True  # statistics summed over ranks in a training step

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        features: Tensor | str | os.PathLike | None = None,
        feature_key: str | None = None,
        projector: Projector = "linear",
        fit_projector: bool = True,
        hidden: int | None = None,
        metric: Metric = "l2",
        beta: float = 0.25,
        init_samples: int = 65536,
        init_batches: int = 8,
        kmeans_iters: int = 10,
        kmeans_balance: float = 0.0,
        usage_window: int = 100,
        backend: Backend = "auto",
        check_finite: bool = True,
    ):
        super().__init__(dim, check_finite)
        check_number("codebook_size", codebook_size, 1, integer=True)
        check_choice("metric", metric, METRICS)
        check_choice("projector", projector, ("linear", "mlp"))
        check_choice("backend", backend, BACKENDS)
        for name, value, low, whole in (("beta", beta, 0, False), ("init_samples", init_samples, 1, True),
                                        ("init_batches", init_batches, 1, True), ("kmeans_iters", kmeans_iters, 0, True),
                                        ("kmeans_balance", kmeans_balance, 0, False), ("usage_window", usage_window, 1, True)):
            check_number(name, value, low, integer=whole)
        if features is None and init_samples < codebook_size:
            raise ValueError(f"init_samples={init_samples} must be >= codebook_size={codebook_size}")
        self._size, self.metric, self.beta, self.backend = codebook_size, metric, beta, backend
        self._self_init = features is None
        self.init_samples, self.init_batches, self.kmeans_iters = init_samples, init_batches, kmeans_iters
        self.kmeans_balance, self.usage_window = kmeans_balance, usage_window

        if features is None:
            feats, ready = torch.randn(codebook_size, dim), False
        else:
            feats, ready = load_features(features, feature_key), not (fit_projector and projector == "linear")
            if feats.shape[0] < codebook_size:
                raise ValueError(f"{feats.shape[0]} feature rows cannot initialise {codebook_size} codes")
            if feats.shape[0] > codebook_size:
                feats, _ = kmeans(feats, codebook_size, kmeans_iters, metric, backend=backend, balance=kmeans_balance,
                                  generator=torch.Generator().manual_seed(0))  # the same codebook on every rank
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
        self.register_buffer("_metric", torch.tensor(METRICS.index(metric)))  # the codes' meaning: kept, checked at load
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
            c = self.projector(as_weights(self.projector, self.features.float())).float()
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
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        load_settings(self, state_dict, prefix, {"_metric": METRICS})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted = bool(self.initted)  # one sync, at load time
        self._pool, self._pool_batches = [], 0

    @torch.no_grad()
    def _collect(self, x: Tensor) -> None:
        """Keep a uniform subsample of this batch (its share of ``init_samples``), then,
        once the pool is full or ``init_batches`` passed, k-means it into the codebook
        (self-initialisation) or fit the projector to it."""
        share = max(1, -(-self.init_samples // self.init_batches))
        held = sum(p.shape[0] for p in self._pool)
        take = min(share, self.init_samples - held, x.shape[0])
        self._pool.append(x[torch.randperm(x.shape[0], device=x.device)[:take]].clone())
        self._pool_batches += 1
        held += take
        # every rank goes on together (each rank's crops, hence its rows, may differ): the k-means or fit is collective
        if not tdist.on_every_rank(held >= self.init_samples or self._pool_batches >= self.init_batches, x.device):
            return
        pool = torch.cat(self._pool)
        pool = pool[torch.isfinite(pool).all(1)]  # a non-finite latent would make a non-finite centre or fit
        self._pool, self._pool_batches = [], 0
        if not self._self_init:
            _check_spread(self.features)
            fit = fit_linear_projector(self.features, pool, reduce_over_ranks=True, backend=self.backend)
            if fit is None:  # latents without spread (yet): collect afresh
                return
            self.projector.weight.copy_(fit[0])
            self.projector.bias.copy_(fit[1])
            self.initted.fill_(True)
            self._initted = True
            return
        enough = pool.shape[0] >= self._size
        distinct = enough and torch.unique(pool, dim=0).shape[0] >= self._size
        if not tdist.on_every_rank(distinct, x.device):
            # too few latents (on a rank): keep them and collect more; fewer distinct ones than codes here (latents all
            # alike, e.g. an encoder starting at zero): collect afresh (no restart would part codes made equal)
            self._pool, self._pool_batches = ([] if enough and not distinct else [pool]), 0
            return
        centres, _ = kmeans(pool, self._size, self.kmeans_iters, self.metric, reduce_over_ranks=True, backend=self.backend,
                            balance=self.kmeans_balance)
        self.features.copy_(centres)
        self.initted.fill_(True)
        self._initted = True
