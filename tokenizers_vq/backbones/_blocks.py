"""Helpers shared by the image, audio and video backbones: input checks and norms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


_ROWS = 256  # pixels per partial sum of the fixed-order statistics


def _fixed_order_sums(rows: Tensor) -> Tensor:
    """``(B, N, C) -> (B, C)`` float64 sums over ``N`` in an order set by the shape alone, not
    by the thread count: partial sums of ``_ROWS`` rows each (an outer reduction, one output
    per lane), then those partials in sequence (``cumsum``)."""
    b, n, c = rows.shape
    full = n // _ROWS * _ROWS
    parts = rows[:, :full].reshape(b, n // _ROWS, _ROWS, c).sum(2)
    if full < n:
        parts = torch.cat([parts, rows[:, full:].sum(1, keepdim=True)], 1)
    return parts.double().cumsum(1)[:, -1]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that gives each item the same result whatever else is in its batch
    and, in fp32 on the CPU, whatever the thread count.

    PyTorch's CPU kernel for a channels-last input splits its sums by batch size and by
    thread, so the same image could get other ids alone or in a batch, or on a machine with
    more cores (about 1 token in 30,000 on photos, at near-ties). There, fp32 statistics are
    summed in an order set by the shape (:func:`_fixed_order_sums`, about twice the kernel's
    time; from a pivot per group, which keeps a large mean from cancelling the variance) and
    other dtypes normalise the items one at a time. (Another instruction set can still
    round the sums differently: AVX2 and AVX-512 agreed, x86 without AVX2 did not.)"""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim > 2 and x.shape[1] == self.num_groups and math.prod(x.shape[2:]) == 1:  # a narrow model's 1 x 1 latent
            return self._one_value_groups(x)
        if not (x.device.type == "cpu" and x.ndim == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        if x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            return self._fixed_order(x)
        if x.shape[0] > 1:
            out = torch.cat([super(GroupNorm, self).forward(item) for item in x.split(1)])
            return out.contiguous(memory_format=torch.channels_last)
        return super().forward(x)

    def _one_value_groups(self, x: Tensor) -> Tensor:
        """Each value normalised to 0 and then the bias, as a batch of several items gets it
        (torch refuses one item of it: "more than 1 value per channel when training")."""
        zero = x - x  # (a non-finite value gives NaN, as torch's formula does)
        if not self.affine:
            return zero
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return zero * self.weight.view(shape) + self.bias.view(shape)

    def _fixed_order(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of channels-last memory
        per_group = c // self.num_groups
        count = h * w * per_group
        pivot = rows[:, :1, ::per_group].repeat_interleave(per_group, 2)  # (B, 1, C): a value of each group
        d = rows - pivot
        s1 = _fixed_order_sums(d).view(b, self.num_groups, per_group).cumsum(-1)[..., -1]
        s2 = _fixed_order_sums(d * d).view(b, self.num_groups, per_group).cumsum(-1)[..., -1]
        mean_d = s1 / count
        rstd = ((s2 / count - mean_d * mean_d).clamp_min(0) + self.eps).rsqrt()
        mean = mean_d + pivot[:, 0, ::per_group].double()
        scale = rstd.repeat_interleave(per_group, 1)
        shift = -mean.repeat_interleave(per_group, 1) * scale
        if self.affine:
            scale, shift = scale * self.weight.double(), shift * self.weight.double() + self.bias.double()
        return torch.addcmul(shift.float()[:, :, None, None], x, scale.float()[:, :, None, None])


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


class PointwiseConv(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (the same weights and state dict) whose channels-last CPU inputs go
    through a matrix product over the channels instead: oneDNN's 1x1 convolutions split the
    channel sums between threads on some CPUs (AVX-512 on an AMD EPYC: 256 channels at 21 x 31
    positions), so the latents, and a photo's codes, depended on the thread count; MKL's
    product gave the same sums for 1 and 2 threads at every size tried."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)
