"""Helpers shared by the image, audio and video backbones: input checks and norms."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def check_input(x: Tensor, *, what: str, layout: str, channels: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor with ``len(layout)``
    axes, ``channels`` on axis 1 and no empty axis.

    Args:
        x: the tensor handed to a backbone's ``forward``.
        what: what ``x`` is, for the message (e.g. ``"image"``, ``"latent"``).
        layout: axis names, e.g. ``"BCHW"``; its length is the expected rank.
        channels: the expected size of axis 1.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a torch.Tensor {what}, got {type(x).__name__}")
    if x.ndim != len(layout):
        raise ValueError(f"{what} must have {len(layout)} axes ({', '.join(layout)}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{what} has {x.shape[1]} channels but this backbone expects {channels} (shape {tuple(x.shape)})"
        )
    if x.numel() == 0:
        raise ValueError(f"empty {what}: shape {tuple(x.shape)}")


def check_multiple(size: int, factor: int, *, what: str, factor_name: str) -> None:
    """Raise ``ValueError`` unless ``size`` is a multiple of ``factor``, with a
    message such as ``"audio length 1000 is not a multiple of hop 320"``."""
    if size % factor != 0:
        raise ValueError(f"{what} {size} is not a multiple of {factor_name} {factor}")


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that gives each item the same result whatever else is in its batch.

    On a channels-last input the CPU kernel splits its sums by batch size, so an image
    encoded alone and in a batch could get different ids; there it normalises the items
    one at a time (the same work; a few calls more per layer)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.ndim == 4 and x.shape[0] > 1 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            out = torch.cat([super(GroupNorm, self).forward(item) for item in x.split(1)])
            return out.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``gcd(channels, max_groups)`` groups: VQGAN's 32 for the usual
    widths, fewer for narrow test configs (e.g. 8 groups at 8 channels)."""
    groups = math.gcd(channels, max_groups)
    return GroupNorm(groups, channels, eps=1e-6)


def check_positive(name: str, values: tuple[int, ...] | int) -> None:
    """Raise ``ValueError`` unless every value is an integer ``>= 1``."""
    vals = values if isinstance(values, tuple) else (values,)
    if not vals or any(not isinstance(v, int) or v < 1 for v in vals):
        raise ValueError(f"{name} must be a positive integer (or a non-empty tuple of them), got {values!r}")


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
