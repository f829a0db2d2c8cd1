"""Codebook shrinking (Mao et al. 2023, "Extreme Image Compression using Fine-tuned
VQGANs"): k-means a trained codebook into a smaller one and remap the old codes to
the new, giving lower-bitrate variants of one model without retraining."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenizers_vq.quantizers._functional import nearest_codes
from tokenizers_vq.quantizers.base import check_number
from tokenizers_vq.quantizers.kmeans import kmeans
from tokenizers_vq.quantizers.vq import VectorQuantizer


@torch.no_grad()
def shrink_codebook(
    vq: VectorQuantizer,
    codebook_size: int,
    iters: int = 20,
    usage_weighted: bool = True,
    seed: int = 0,
) -> tuple[VectorQuantizer, Tensor]:
    """Cluster ``vq``'s ``K`` codewords into ``codebook_size`` and build the smaller quantizer.

    Args:
        vq: a trained :class:`VectorQuantizer` (left unchanged).
        codebook_size: the new ``K' < K``.
        iters: k-means iterations.
        usage_weighted: weight each old codeword by its EMA usage (``cluster_size``),
            so that the new centres follow where latents actually fall.
        seed: seed of the k-means initialisation.

    Returns:
        ``(small, remap)``: a :class:`VectorQuantizer` with the same settings,
        projections and dtype/device, whose codebook is the k-means centres (its
        usage statistics are the summed old ones); and ``remap`` ``(K,)`` int64, the
        nearest new code of every old code, so ``small.decode(remap[codes])`` is the
        shrunk model's reading of codes of the large one.

    Example:
        >>> small, remap = shrink_codebook(VectorQuantizer(8, 256), 16)
        >>> small.codebook_size, remap.shape
        (16, torch.Size([256]))
    """
    if not isinstance(vq, VectorQuantizer):
        raise ValueError(f"shrink_codebook takes a VectorQuantizer, got {type(vq).__name__}")
    check_number("codebook_size", codebook_size, 1, vq.codebook_size, integer=True, open_high=True)
    old = vq.codebook
    weights = vq.cluster_size.float().clamp_min(1e-6) if usage_weighted else None
    gen = torch.Generator().manual_seed(seed)
    centres, _ = kmeans(old, codebook_size, iters, vq.metric, weights, backend=vq.backend, generator=gen)
    _, remap = nearest_codes(old, centres, vq.metric, vq.backend)

    small = VectorQuantizer(
        vq.dim,
        codebook_size,
        codebook_dim=vq.codebook_dim,
        metric=vq.metric,
        learning=vq.learning,
        decay=vq.decay,
        eps=vq.eps,
        beta=vq.beta,
        kmeans_init=False,
        kmeans_iters=vq.kmeans_iters,
        kmeans_max_samples=vq.kmeans_max_samples,
        dead_code_threshold=vq.dead_code_threshold,
        restart_dead_codes=vq.restart_dead_codes,
        estimator=vq.estimator,
        orthogonal_weight=vq.orthogonal_weight,
        orthogonal_sample=vq.orthogonal_sample,
        diversity_weight=vq.diversity_weight,
        diversity_sample=vq.diversity_sample,
        diversity_temperature=vq.diversity_temperature,
        sample_temperature=vq.sample_temperature,
        affine=vq.affine,
        affine_decay=vq.affine_decay,
        backend=vq.backend,
        check_finite=vq.check_finite,
    ).to(device=old.device)
    small.project_in.load_state_dict(vq.project_in.state_dict())
    small.project_out.load_state_dict(vq.project_out.state_dict())
    counts = torch.zeros(codebook_size, device=old.device).index_add_(0, remap, vq.cluster_size.float())
    if vq.affine:  # the same running statistics, and stored rows that they map onto the centres
        for name in ("latent_mean", "latent_var", "embed_mean", "embed_std"):
            getattr(small, name).copy_(getattr(vq, name))
        centres = small._raw(centres)
    small.embed.data.copy_(centres.to(small.embed.dtype))
    small.cluster_size.copy_(counts)
    if vq.learning == "ema":
        small.embed_sum.copy_(centres * counts.unsqueeze(1))
    small.to(dtype=vq.embed.dtype)  # a bf16 quantizer shrinks to a bf16 one
    small.train(vq.training)
    return small, remap


def shrink_family(vq: VectorQuantizer, sizes: list[int], **kwargs) -> dict[int, tuple[VectorQuantizer, Tensor]]:
    """:func:`shrink_codebook` for each size in ``sizes`` (each from the original ``vq``)."""
    return {k: shrink_codebook(vq, k, **kwargs) for k in sizes}
