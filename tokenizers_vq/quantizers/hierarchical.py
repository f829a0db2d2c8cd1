"""Two-level hierarchical quantization (Razavi et al. 2019, VQ-VAE-2; used for
inpainting by Peng et al. 2021, "Generating Diverse Structure for Image Inpainting
With Hierarchical VQ-VAE").

A top level quantizes the latent pooled by 2 along every spatial axis; the bottom
level quantizes the full-resolution latent conditioned on the decoded, upsampled
top; the output mixes both. Pooling and upsampling act per axis, so one module
serves 1D (audio), 2D (image) and 3D (video) latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import check_codeword_outputs
from tokenizers_vq.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    as_weights,
    check_same_codes,
    evaluating,
    merge_outputs,
)


@dataclass
class HierarchicalOutput(QuantizerOutput):
    """:class:`QuantizerOutput` plus each level's codes at its own resolution.

    Attributes:
        codes_per_level: ``{"top": (B, *ceil(S/2), *cs), "bottom": (B, *S, *cs)}``.
    """

    codes_per_level: dict[str, Tensor] = field(default_factory=dict)


def pool2(x: Tensor) -> Tensor:
    """Mean over 2-blocks of every spatial axis: ``(B, *S, D) -> (B, *ceil(S/2), D)``.
    An odd axis is padded by repeating its last slice (documented padding)."""
    for axis in range(1, x.ndim - 1):
        if x.shape[axis] % 2:
            x = torch.cat([x, x.narrow(axis, x.shape[axis] - 1, 1)], dim=axis)
    b, spatial, d = x.shape[0], x.shape[1:-1], x.shape[-1]
    split = [b]
    for s in spatial:
        split += [s // 2, 2]
    x = x.reshape(*split, d)
    return x.mean(dim=tuple(range(2, 2 * len(spatial) + 1, 2)))


def upsample2(x: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """Nearest-neighbour upsampling by 2 per spatial axis, cropped to ``spatial``."""
    for axis, s in enumerate(spatial, start=1):
        x = x.repeat_interleave(2, dim=axis).narrow(axis, 0, s)
    return x


def coarse_view(codes: Tensor, n_spatial: int) -> Tensor:
    """Every other position along the ``n_spatial`` axes after the batch axis."""
    index = (slice(None),) + (slice(None, None, 2),) * n_spatial
    return codes[index]


class HierarchicalQuantizer(Quantizer):
    """Top + bottom quantizers; ``(B, *S, D) -> codes (B, *S, 2, *inner_code_shape)``.

    Level axis entry 0 holds the top code of the coarse cell covering each position
    (repeated over its 2-block, so ``codes`` keeps the contract's one-tensor shape),
    entry 1 the bottom code. The compact per-level codes are in
    :attr:`HierarchicalOutput.codes_per_level` and :meth:`encode_levels`;
    :meth:`decode_levels` inverts them. ``decode`` reads the top codes at even
    positions only.

    Layers (all ``D -> D`` per position, so any number of spatial axes works):
    ``top_in`` after pooling, ``top_out`` after upsampling the top's output,
    ``fuse`` (``2D -> D``) makes the bottom input from the latent and the decoded
    top, ``out`` (``2D -> D``) mixes both levels. They start as a two-level
    residual: ``fuse`` gives ``z - up(top)``, ``out`` gives ``bottom + up(top)``.

    Args:
        top: quantizer of the pooled latent.
        bottom: quantizer of the conditioned full-resolution latent (same ``dim``,
            ``codebook_size`` and code shape as ``top``).

    Example:
        >>> hq = HierarchicalQuantizer(VectorQuantizer(32, 512), VectorQuantizer(32, 512))
        >>> out = hq(torch.randn(2, 16, 16, 32))
        >>> out.codes.shape, out.codes_per_level["top"].shape
        (torch.Size([2, 16, 16, 2]), torch.Size([2, 8, 8]))
    """

    positionwise = False  # the top level codes regions of the bottom one

    def __init__(self, top: Quantizer, bottom: Quantizer):
        check_same_codes([top, bottom], "HierarchicalQuantizer")
        check_codeword_outputs([top], "HierarchicalQuantizer (its top level)")
        if top.dim != bottom.dim:
            raise ValueError(f"HierarchicalQuantizer: top and bottom dims differ ({top.dim} vs {bottom.dim})")
        super().__init__(top.dim, check_finite=top.check_finite)
        d = top.dim
        self.top, self.bottom = top, bottom
        self.top_in, self.top_out = nn.Linear(d, d), nn.Linear(d, d)
        self.fuse, self.out = nn.Linear(2 * d, d), nn.Linear(2 * d, d)
        eye = torch.eye(d)
        with torch.no_grad():
            for lin, w in ((self.top_in, eye), (self.top_out, eye)):
                lin.weight.copy_(w)
            self.fuse.weight.copy_(torch.cat([eye, -eye], 1))
            self.out.weight.copy_(torch.cat([eye, eye], 1))
            for lin in (self.top_in, self.top_out, self.fuse, self.out):
                lin.bias.zero_()

    @property
    def codebook_size(self) -> int:
        return self.top.codebook_size

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (2, *self.top.code_shape)

    def num_tokens(self, grid: Sequence[int]) -> int:
        """The coarse grid's top codes (repeated over each 2-block in ``codes``) and the bottom codes."""
        return self.top.num_tokens([-(-n // 2) for n in grid]) + self.bottom.num_tokens(grid)

    # ------------------------------------------------------------------------------------
    def _spatial(self, x: Tensor, n_inner: int) -> tuple[int, ...]:
        spatial = tuple(x.shape[1 : x.ndim - n_inner])
        if not spatial:
            raise ValueError(f"HierarchicalQuantizer needs at least one spatial axis, got shape {tuple(x.shape)}")
        return spatial

    def _forward(self, z: Tensor) -> HierarchicalOutput:
        spatial = self._spatial(z, 1)
        top_out = self.top(self.top_in(pool2(z)))
        up = self._up(top_out.quantized, spatial)
        bottom_out = self.bottom(self.fuse(torch.cat([z, up.to(z.dtype)], -1)))
        quantized = self._mix(bottom_out.quantized, up).to(z.dtype)
        losses, metrics = merge_outputs([top_out, bottom_out], "level")
        n_lvl_axis = z.ndim - 1
        top_dense = upsample2(top_out.codes, spatial)
        codes = torch.stack([top_dense, bottom_out.codes], dim=n_lvl_axis)
        per_level = {"top": top_out.codes, "bottom": bottom_out.codes}
        return HierarchicalOutput(quantized, codes, losses, metrics, per_level)

    def _up(self, top_q: Tensor, spatial: tuple[int, ...]) -> Tensor:
        return self.top_out(as_weights(self.top_out, upsample2(top_q.float(), spatial)))

    def _mix(self, bottom_q: Tensor, up: Tensor) -> Tensor:
        return self.out(as_weights(self.out, torch.cat([bottom_q.float(), up.float()], -1)))

    def _decode(self, codes: Tensor) -> Tensor:
        n_inner = len(self.top.code_shape)
        top_dense, bottom = codes.unbind(codes.ndim - 1 - n_inner)
        spatial = self._spatial(bottom, n_inner)
        return self._decode_pair(coarse_view(top_dense, len(spatial)), bottom, spatial)

    def _decode_pair(self, top: Tensor, bottom: Tensor, spatial: tuple[int, ...]) -> Tensor:
        up = self._up(self.top._decode(top), spatial)
        return self._mix(self.bottom._decode(bottom), up)

    # -- per-level codes -------------------------------------------------------------------
    @torch.no_grad()
    def encode_levels(self, z: Tensor) -> dict[str, Tensor]:
        """``{"top": (B, *ceil(S/2), *cs), "bottom": (B, *S, *cs)}`` codes of ``z``."""
        self._check_latent(z, defer=True)
        with evaluating(self):  # each part back in its own mode (a frozen level stays frozen)
            return self._forward(self._in_weight_dtype(z)).codes_per_level

    def decode_levels(self, top: Tensor, bottom: Tensor) -> Tensor:
        """Latents ``(B, *S, D)`` from per-level codes (the inverse of :meth:`encode_levels`)."""
        n_inner = len(self.top.code_shape)
        top, bottom = self.top._check_codes(top), self.bottom._check_codes(bottom)
        spatial = self._spatial(bottom, n_inner)
        expected = tuple(-(-s // 2) for s in spatial)
        if top.shape[0] != bottom.shape[0] or self._spatial(top, n_inner) != expected:
            raise ValueError(
                f"top codes must be (B, *ceil(S/2), ...) = {(bottom.shape[0], *expected)} for bottom codes "
                f"{tuple(bottom.shape)}; got {tuple(top.shape)}"
            )
        return self._decode_pair(top, bottom, spatial)
