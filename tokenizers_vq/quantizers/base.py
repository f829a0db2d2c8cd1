"""The contract every quantizer follows.

Layout: latents are channels-last, ``z`` of shape ``(B, *S, D)`` where ``S`` is any
number of spatial / temporal axes (``()`` for a single vector per item, ``(T,)``
for audio, ``(H, W)`` for images, ``(T, H, W)`` for video). Codes have shape
``(B, *S, *code_shape)`` with ``code_shape`` ``()`` for a single codebook and e.g.
``(L,)`` for L residual levels; every code lies in ``[0, codebook_size)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokenizers_vq import deferred
from tokenizers_vq.distributed import is_distributed


MAX_LATENT_MAGNITUDE = 1e15
"""Largest ``|value|`` a latent may hold when ``check_finite`` is on. Squared distances
and losses of values from about 1e19 overflow float32 (and bf16): Inf losses, and an
Inf or NaN codebook after an EMA update. 1e15 leaves room for sums over many channels
and positions."""


def _check_peak(peak: Tensor) -> None:
    """Refuse a latent whose largest magnitude ``peak`` is NaN, Inf or over the limit (one sync)."""
    value = float(peak)
    if not math.isfinite(value):
        raise ValueError("latent contains NaN or Inf values")
    if value > MAX_LATENT_MAGNITUDE:
        raise ValueError(f"latent has values of magnitude {value:.3g}, over the limit of {MAX_LATENT_MAGNITUDE:.0e} "
                         "(their squared distances overflow float32); the encoder has likely diverged")


def _check_code_range(lo_hi: Tensor, size: int) -> None:
    """Refuse codes whose ``(min, max)`` leave ``[0, size)`` (one sync)."""
    lo, hi = lo_hi.tolist()
    if lo < 0 or hi >= size:
        masked = (" (-1 is the code forward and encode give positions a mask left out: decode the real positions"
                  " only, or replace the -1s, e.g. codes.clamp(min=0), and drop those positions after decoding)"
                  if lo == -1 else "")
        raise ValueError(f"codes out of range: found values in [{lo}, {hi}], valid range is [0, {size}){masked}")


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """Every submodule of ``module`` in eval mode inside the block, and each one's own mode
    back after it (unlike ``train()``, which would put a part frozen in eval back in training)."""
    modes = [(m, m.training) for m in module.modules()]
    if any(training for _, training in modes):
        module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def rows_of_items(module: nn.Module, items: Tensor, n_items: int):
    """Per-item randomness of ``module``'s quantizers (residual dropout) drawn per item of a flat
    ``(1, M, D)`` latent inside the block: ``items`` ``(M,)`` each row's item in ``[0, n_items)``."""
    takers = [m for m in module.modules() if hasattr(m, "_row_items")]
    try:
        for m in takers:
            m._row_items = (items, n_items)
        yield
    finally:
        for m in takers:
            m._row_items = None


def as_weights(layer: nn.Module, x: Tensor) -> Tensor:
    """``x`` in the dtype of ``layer``'s first floating parameter outside autocast (fp32 values
    into a layer of bf16 or fp16 weights); as it is under autocast or for a layer without any."""
    p = None if torch.is_autocast_enabled(x.device.type) else next(
        (p for p in layer.parameters() if p.is_floating_point()), None)
    return x if p is None or p.dtype == x.dtype else x.to(p.dtype)


@dataclass
class QuantizerOutput:
    """What every quantizer's ``forward`` returns.

    Attributes:
        quantized: ``(B, *S, D)``, same shape and dtype as the input; gradients
            reach the input through the quantizer's estimator.
        codes: ``(B, *S, *code_shape)`` int64 code indices.
        losses: named scalar losses, already multiplied by the quantizer's own
            weights (e.g. ``beta`` for commitment), ready to be summed.
        metrics: named scalar diagnostics (detached), e.g. ``perplexity``.
    """

    quantized: Tensor
    codes: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def total_loss(self) -> Tensor:
        """Sum of all named losses (a zero scalar when there are none)."""
        if not self.losses:
            return self.quantized.new_zeros((), dtype=torch.float32)
        return torch.stack([v.float() for v in self.losses.values()]).sum()


torch.utils._pytree.register_pytree_node(  # a pytree: make_graphed_callables and tree_map take it whole
    QuantizerOutput, lambda o: ([o.quantized, o.codes, o.losses, o.metrics], None), lambda v, _: QuantizerOutput(*v))


class Quantizer(nn.Module, ABC):
    """Base class: ``forward(z) -> QuantizerOutput``, ``encode(z) -> codes``,
    ``decode(codes) -> quantized``.

    Subclasses implement :meth:`_forward` and :meth:`_decode` on validated input;
    the public methods validate shapes, dtypes and values once, here.

    Args:
        dim: ``D``, the size of the latent's last axis.
        check_finite: raise on latents holding NaN, Inf or values of magnitude
            over :data:`MAX_LATENT_MAGNITUDE`. This costs one host
            synchronisation per call; turn it off for the fastest GPU training
            (the check is skipped inside ``torch.compile`` regardless).
    """

    positionwise: bool = True
    """Each position is quantized on its own (so a mask can leave positions out); False
    for quantizers that look at neighbouring positions."""

    exchanges: bool = False
    """A training step exchanges statistics with the other ranks of a process group
    (codebook statistics, an entropy over every rank's batch): every rank must take part."""

    def __init__(self, dim: int, check_finite: bool = True):
        super().__init__()
        check_number("dim", dim, 1, integer=True)
        self.dim = dim
        self.check_finite = check_finite

    # -- properties every quantizer has ------------------------------------------------
    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """Number of distinct values one code can take (codes lie in ``[0, size)``)."""

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Trailing shape of the codes for one latent position (``()`` by default)."""
        return ()

    @property
    def num_codebooks(self) -> int:
        """Number of codes emitted per latent position."""
        return math.prod(self.code_shape)

    def num_tokens(self, grid: Sequence[int]) -> int:
        """Tokens that a latent of ``grid`` positions carries (what a bitrate counts):
        ``prod(grid) * num_codebooks`` unless a quantizer repeats codes over positions."""
        return math.prod(grid) * self.num_codebooks

    # -- the contract --------------------------------------------------------------------
    def forward(self, z: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        """Quantize ``z`` ``(B, *S, D)``; see :class:`QuantizerOutput`.

        Outside autocast, a latent of another float dtype than the quantizer's weights
        (e.g. bf16 activations and fp32 projections) is quantized in the weights' dtype
        and ``quantized`` is cast back to the latent's dtype.

        ``mask`` ``(B, *S)`` bool, True where a position is real (e.g. the padding of a
        variable-length audio batch is False): only those positions are quantized, so
        padding counts neither in the codebook statistics nor in the losses or metrics
        (exactly as if the real positions came alone, with per-item randomness such as
        residual dropout still drawn per item); padded positions pass ``z``
        through unchanged (NaN too: only real positions are checked) and get code -1. Position-wise quantizers only
        (:attr:`positionwise`); not for ``torch.compile(fullgraph=True)`` (the number of
        real positions is data); under a process group a quantizer that :attr:`exchanges`
        statistics needs at least one real position on every rank in a training step, and a
        rank without one is refused."""
        self._check_latent(z, finite=mask is None)  # (masked: the real positions, in the forward of them alone)
        if mask is not None:
            return self._forward_masked(z, mask)
        zc = self._in_weight_dtype(z)
        if zc is z:
            return self._forward(z)
        out = self._forward(zc)
        return QuantizerOutput(out.quantized.to(z.dtype), out.codes, out.losses, out.metrics)

    @torch.no_grad()
    def encode(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """Codes ``(B, *S, *code_shape)`` for latents ``z`` ``(B, *S, D)`` (-1 where
        ``mask`` is False, see :meth:`forward`). Never updates codebook statistics."""
        self._check_latent(z, defer=True, finite=mask is None)
        with evaluating(self):  # a child left training is not trained
            if mask is not None:
                return self._forward_masked(z, mask).codes
            return self._codes(self._in_weight_dtype(z))

    def _codes(self, z: Tensor) -> Tensor:
        """``_forward(z).codes`` in eval mode. A quantizer overrides it to skip what
        :meth:`encode` discards (the quantized latent, losses, metrics): at a small batch
        on a GPU each skipped operator is host time saved."""
        return self._forward(z).codes

    def _project_out(self, x: Tensor) -> Tensor:
        """``project_out(x)`` for looked-up values ``x`` (fp32 codebooks and levels), fed as
        ``_forward`` feeds it (:func:`as_weights`)."""
        return self.project_out(as_weights(self.project_out, x))

    def decode(self, codes: Tensor) -> Tensor:
        """Latents ``(B, *S, D)`` for codes ``(B, *S, *code_shape)``."""
        out = self._decode(self._check_codes(codes))  # rounded as forward rounds, in half-precision weights
        return self._in_weight_dtype(out).to(out.dtype)

    @abstractmethod
    def _forward(self, z: Tensor) -> QuantizerOutput: ...

    @abstractmethod
    def _decode(self, codes: Tensor) -> Tensor: ...

    def _in_weight_dtype(self, z: Tensor) -> Tensor:
        """``z`` in the dtype of the first floating parameter or buffer, unless autocast
        is on for its device (autocast then picks the dtypes; a latent of a third float
        dtype, e.g. fp16 in a CPU bf16 region, where ``cat`` refuses it, goes in fp32)
        or they already agree."""
        if torch.is_autocast_enabled(z.device.type):
            return z if z.dtype in (torch.float32, torch.get_autocast_dtype(z.device.type)) else z.float()
        t = next((t for ts in (self.parameters(), self.buffers()) for t in ts if t.is_floating_point()), None)
        return z if t is None or t.dtype == z.dtype else z.to(t.dtype)  # (stops at the first: host time)

    # -- validation ----------------------------------------------------------------------
    def _check_latent(self, z: Tensor, defer: bool = False, finite: bool = True) -> None:
        if not isinstance(z, Tensor):
            raise ValueError(f"expected a torch.Tensor latent, got {type(z).__name__}")
        if not z.is_floating_point():
            raise ValueError(f"latent must be a floating-point tensor, got dtype {z.dtype}")
        if z.ndim < 2:
            raise ValueError(f"latent must be (B, ..., D) with at least 2 axes, got shape {tuple(z.shape)}")
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"latent's last dimension is {z.shape[-1]} but this quantizer expects D={self.dim} "
                f"(shape {tuple(z.shape)}; layout is channels-last (B, ..., D))"
            )
        if z.numel() == 0:
            raise ValueError(f"empty latent batch: shape {tuple(z.shape)}")
        if finite and self.check_finite and not torch.compiler.is_compiling():
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise ValueError(f"{type(self).__name__}(check_finite=True) reads the latent's range on the host, which a "
                                 "CUDA graph capture cannot wait for: build it with check_finite=False to capture it")
            lo, hi = torch.aminmax(z.detach())
            peak = torch.maximum(-lo, hi)  # NaN propagates
            if defer:  # nothing updates statistics from it: may wait for the caller's sync
                deferred.check(peak, _check_peak)
            else:
                _check_peak(peak)

    def _forward_masked(self, z: Tensor, mask: Tensor) -> QuantizerOutput:
        """The real positions quantized alone (as one ``(1, M, D)`` latent), scattered back."""
        if not self.positionwise:
            raise ValueError(f"{type(self).__name__} does not quantize each position on its own (neighbours, or batches "
                             "shared across ranks), so a mask cannot leave positions out; use a position-wise quantizer")
        if (not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(z.shape[:-1])
                or mask.device != z.device):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(z.shape[:-1])} (the latent's shape without "
                             f"its last axis) on {z.device}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))} on {getattr(mask, 'device', '-')}")
        cs = self.code_shape
        codes = torch.full((*mask.shape, *cs), -1, dtype=torch.int64, device=z.device)
        valid = z[mask]
        if valid.shape[0] == 0:
            if self.training and is_distributed() and any(getattr(m, "exchanges", False) for m in self.modules()):
                # its peers' statistics exchange would wait for it, or pair with another collective
                raise ValueError("this rank's mask has no real position, but under a process group every rank "
                                 "exchanges codebook statistics in each training step: leave batches that are all "
                                 "padding out of the data (or give this rank at least one real position)")
            return QuantizerOutput(z, codes)
        items = torch.arange(z.shape[0], device=z.device).view(-1, *([1] * (mask.ndim - 1))).expand(mask.shape)
        with rows_of_items(self, items[mask], z.shape[0]):  # per-item randomness stays per item
            out = self.forward(valid.unsqueeze(0))
        quantized = z.masked_scatter(mask.unsqueeze(-1).expand_as(z), out.quantized[0].to(z.dtype))
        codes = codes.masked_scatter(mask.reshape(*mask.shape, *([1] * len(cs))).expand_as(codes), out.codes[0])
        return QuantizerOutput(quantized, codes, out.losses, out.metrics)

    def _check_codes(self, codes: Tensor) -> Tensor:
        """``codes`` checked for shape, dtype and range, as they may be looked up: inside a
        :func:`~tokenizers_vq.deferred.deferred_checks` block the range check is queued and
        the codes come back clamped into range (an out-of-range lookup on a GPU is a device
        assert that ends the process's CUDA context)."""
        if not isinstance(codes, Tensor):
            raise ValueError(f"expected a torch.Tensor of codes, got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (a shard's '<u2' ids); torch cannot take
            codes = codes.long()  # their min and max, and uint64 past 2^63 turns negative: refused below
        cs = self.code_shape
        if codes.ndim < 1 + len(cs) or tuple(codes.shape[codes.ndim - len(cs) :]) != cs:
            raise ValueError(f"codes must be (B, ..., *{cs}), got shape {tuple(codes.shape)}")
        if codes.numel() == 0:
            raise ValueError(f"empty code batch: shape {tuple(codes.shape)}")
        if torch.compiler.is_compiling():
            return codes
        lo_hi = torch.stack([codes.min(), codes.max()])
        if deferred.pending():  # looked up clamped (no device-side assert); refused when the block ends
            deferred.check(lo_hi, functools.partial(_check_code_range, size=self.codebook_size))
            return codes.clamp(0, min(self.codebook_size - 1, torch.iinfo(codes.dtype).max))
        _check_code_range(lo_hi, self.codebook_size)
        return codes


def check_number(name: str, value: object, low: float, high: float = math.inf, *, integer: bool = False,
                 open_low: bool = False, open_high: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a number (a whole one with
    ``integer``; never a bool) in ``[low, high]`` (ends left out with ``open_low`` / ``open_high``)."""
    kind = numbers.Integral if integer else numbers.Real  # numpy scalars too
    number = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)):
        span = f"{'(' if open_low else '['}{low}, {high}{')' if open_high or high == math.inf else ']'}"
        raise ValueError(f"{name} must be {'a whole number' if integer else 'a number'} in {span}, got {value!r}")


def load_settings(q: nn.Module, state_dict: dict, prefix: str,
                  shown: dict[str, Callable[[Any], object] | tuple]) -> None:
    """For ``_load_from_state_dict``: the settings ``q`` keeps as buffers (names of ``shown``, each with how
    to show a saved value, or the names a saved index stands for) must equal the saved ones, or the codes
    would mean other values; weights saved before a setting was kept load as this ``q``'s."""
    for name, show in shown.items():
        show = (lambda i, names=show: names[i] if 0 <= i < len(names) else i) if isinstance(show, tuple) else show
        key, own = prefix + name, getattr(q, name)
        if key not in state_dict:
            state_dict[key] = own.clone()
        elif state_dict[key].shape != own.shape or not torch.equal(state_dict[key].to(own.device), own):
            setting, cls = name.lstrip("_"), type(q).__name__
            raise ValueError(f"{cls} weights saved with {setting} {show(state_dict[key].tolist())!r} cannot load into "
                             f"a {cls} with {setting} {show(own.tolist())!r}: build it as the weights were saved")


def check_float32_statistics(q: nn.Module, state: Tensor) -> None:
    """Refuse to train a quantizer whose codebook statistics (``state``, a buffer) were cast
    out of float32 (``model.half()``): EMA updates in half precision lose the small steps."""
    if q.training and state.dtype != torch.float32:
        raise ValueError(f"{type(q).__name__} keeps its codebook statistics in float32, but they are {state.dtype} "
                         "(the model was cast with .half() or .to(dtype)); train it in float32 (quantizer.float(); "
                         "the rest may stay in half precision), or train under torch.autocast instead")


def codebook_projections(q: Quantizer, codebook_size: int, codebook_dim: int | None) -> int:
    """Check ``codebook_size`` and give ``q`` its ``project_in``/``project_out`` between the
    latent's ``D`` and ``codebook_dim`` (identities when they agree); returns the codeword size."""
    check_number("codebook_size", codebook_size, 1, integer=True)
    if codebook_dim is not None:
        check_number("codebook_dim", codebook_dim, 1, integer=True)
    d = codebook_dim or q.dim
    q.project_in = nn.Linear(q.dim, d) if d != q.dim else nn.Identity()
    q.project_out = nn.Linear(d, q.dim) if d != q.dim else nn.Identity()
    return d


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise a ValueError naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def flatten_latent(z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(B, *S, D) -> (N, D)`` plus the leading shape ``(B, *S)`` to undo it."""
    return z.reshape(-1, z.shape[-1]), tuple(z.shape[:-1])


# -- for wrappers over several quantizers (residual, grouped, hierarchical) -------------
def check_same_codes(quantizers: Sequence[Quantizer], what: str) -> None:
    """Wrapped quantizers must agree on codebook size and code shape, so that their
    codes stack into one integer tensor."""
    if not quantizers:
        raise ValueError(f"{what} needs at least one quantizer")
    first = quantizers[0]
    for q in quantizers[1:]:
        if q.codebook_size != first.codebook_size or q.code_shape != first.code_shape:
            raise ValueError(f"{what}: all quantizers must share codebook_size and code_shape; got "
                             f"{first.codebook_size}/{first.code_shape} and {q.codebook_size}/{q.code_shape}")


def merge_outputs(outs: Sequence[QuantizerOutput], prefix: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Losses summed by name over the parts; metrics kept per part as ``name/{prefix}{i}``."""
    losses: dict[str, Tensor] = {}
    metrics: dict[str, Tensor] = {}
    for i, out in enumerate(outs):
        for k, v in out.losses.items():
            losses[k] = losses[k] + v if k in losses else v
        for k, v in out.metrics.items():
            metrics[f"{k}/{prefix}{i}"] = v
    return losses, metrics
