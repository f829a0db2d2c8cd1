"""Residual quantization over any quantizer (Zeghidour et al. 2021, SoundStream;
Lee et al. 2022, RQ-VAE): level ``i`` quantizes what levels ``< i`` left over. Options:
one codebook shared by every level (as RQ-VAE), and a beam search over the levels'
candidate codes at encode time (as in the multi-path search of residual VQ encoders,
e.g. Guo et al. 2016 / Babenko and Lempitsky 2014 for additive quantization)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenizers_vq.quantizers._functional import check_codeword_outputs, code_histogram, perplexity
from tokenizers_vq.quantizers.base import (Quantizer, QuantizerOutput, check_number, check_same_codes, load_settings,
                                           merge_outputs)



def _level_latent(level: Quantizer, codes: Tensor) -> Tensor:
    """A level's latent for its ``codes``, rounded to its weights' dtype outside autocast: the
    values (and dtype) its forward gives the residual stack."""
    return level._in_weight_dtype(level._decode(codes))

class ResidualQuantizer(Quantizer):
    """``L`` quantizers applied to successive residuals; codes gain a level axis.

    Codes are ``(B, *S, L, *inner_code_shape)``; the quantized latent is the sum of
    the levels' outputs. Each level keeps its own gradient estimator.

    Args:
        levels: the ``L`` quantizers (same ``dim``, ``codebook_size`` and code shape),
            e.g. ``[VectorQuantizer(64, 1024) for _ in range(8)]`` or FSQs.
        dropout: probability that a training item keeps only its first ``n`` levels,
            ``n`` uniform in ``[1, L]`` (quantizer dropout, SoundStream), so that the
            model decodes well from any prefix of levels. The dropped levels still code the
            item (their codes and statistics are those of an undropped pass); only
            ``quantized`` leaves them out.
        shared_levels: when > 0, ``levels`` holds one quantizer whose codebook every one of
            ``shared_levels`` levels uses (its statistics are updated once per level).
        beam_size: when > 1, evaluation and :meth:`encode` keep the ``beam_size`` best
            partial sums at each level (each extended by its residual's ``beam_size``
            nearest codes, ranked by the remaining squared error) instead of the greedy
            choice: a smaller error for the same codes. Training stays greedy. Levels must
            offer ``candidates`` (:class:`~tokenizers_vq.quantizers.VectorQuantizer`). With
            ``shared_levels`` a cell's beam codes come in ascending order: the same codes in
            any order decode alike, so one order is given.

    Example:
        >>> rvq = ResidualQuantizer([VectorQuantizer(32, 256) for _ in range(4)])
        >>> rvq(torch.randn(2, 50, 32)).codes.shape
        torch.Size([2, 50, 4])
    """

    def __init__(self, levels: Sequence[Quantizer], dropout: float = 0.0, shared_levels: int = 0,
                 beam_size: int = 1):
        check_number("shared_levels", shared_levels, 0, integer=True)
        if shared_levels and len(levels) != 1:
            raise ValueError(f"shared_levels={shared_levels} shares one quantizer's codebook: pass levels=[that "
                             f"quantizer], got {len(levels)}")
        check_number("beam_size", beam_size, 1, integer=True)
        if beam_size > 1 and not all(hasattr(q, "candidates") for q in levels):
            raise ValueError(f"beam_size={beam_size}: needs beam_size >= 1, and for a beam levels that offer "
                             f"candidate codes (VectorQuantizer), got {sorted({type(q).__name__ for q in levels})}")
        check_same_codes(levels, "ResidualQuantizer")
        check_codeword_outputs(levels, "ResidualQuantizer")
        super().__init__(levels[0].dim, check_finite=levels[0].check_finite)
        if any(q.dim != self.dim for q in levels):
            raise ValueError("ResidualQuantizer: all levels must have the same dim")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.levels = nn.ModuleList(levels)
        self.dropout, self.shared_levels, self.beam_size = dropout, shared_levels, beam_size
        self._row_items: tuple[Tensor, int] | None = None  # see base.rows_of_items
        if shared_levels:  # kept with the weights: weights of another count refuse to load
            self.register_buffer("_shared_levels", torch.tensor(shared_levels))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.shared_levels:
            load_settings(self, state_dict, prefix, {"_shared_levels": int})
        elif prefix + "_shared_levels" in state_dict:
            raise ValueError(f"ResidualQuantizer weights saved with shared_levels {int(state_dict[prefix + '_shared_levels'])}"
                             f" cannot load into one of {len(self.levels)} separate levels: build it as the weights were saved")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def stack(self) -> list[Quantizer]:
        """The quantizer of each level, in order (the same one ``shared_levels`` times)."""
        return [self.levels[0]] * self.shared_levels if self.shared_levels else list(self.levels)

    @property
    def codebook_size(self) -> int:
        return self.levels[0].codebook_size

    @property
    def positionwise(self) -> bool:  # type: ignore[override]
        return all(q.positionwise for q in self.levels)

    @property
    def code_shape(self) -> tuple[int, ...]:
        return (len(self.stack), *self.levels[0].code_shape)

    def num_tokens(self, grid: Sequence[int]) -> int:
        """The tokens of each level's quantizer, summed."""
        return sum(q.num_tokens(grid) for q in self.stack)

    def _forward(self, z: Tensor) -> QuantizerOutput:
        if self.beam_size > 1 and not self.training:
            return self._beam(z)
        keep = self._levels_kept(z) if self.training and self.dropout > 0 else None
        residual, total, outs = z, torch.zeros_like(z, dtype=torch.float32), []
        for i, level in enumerate(self.stack):
            out = level(residual)
            q = out.quantized if keep is None else out.quantized * (keep > i)
            total = total + q.float()
            # a dropped level still takes its share off the residual: the next levels see (and
            # keep statistics of) the residuals they code at inference, not the larger one
            residual = residual - out.quantized.detach()
            outs.append(out)
        losses, metrics = merge_outputs(outs, "level")
        codes = torch.stack([o.codes for o in outs], dim=z.ndim - 1)
        return QuantizerOutput(total.to(z.dtype), codes, losses, metrics)

    def _levels_kept(self, z: Tensor) -> Tensor:
        """The levels each item keeps under dropout, broadcastable to ``z``: ``(B, 1, ..., 1)``, or
        for the flattened ``(1, M, D)`` rows of several items (:func:`~.base.rows_of_items`) ``(1, M, 1)``,
        one draw per item all the same."""
        items, n_items = self._row_items or (None, z.shape[0])
        if items is not None and tuple(z.shape[:-1]) != (1, items.numel()):
            items, n_items = None, z.shape[0]  # rows reshaped on the way here: one draw per batch entry
        n_lv = len(self.stack)
        drop = torch.rand(n_items, device=z.device) < self.dropout
        n_keep = torch.where(drop, torch.randint(1, n_lv + 1, (n_items,), device=z.device), n_lv)
        if items is not None:
            return n_keep[items].view(1, -1, 1)
        return n_keep.view(-1, *([1] * (z.ndim - 1)))

    def _codes(self, z: Tensor) -> Tensor:
        if self.beam_size > 1:
            return self._beam(z).codes
        residual, codes = z, []
        for level in self.stack:  # each level's search and lookup, without its losses and metrics
            codes.append(c := level._codes(level._in_weight_dtype(residual)))
            residual = residual - _level_latent(level, c).to(residual.dtype)
        return torch.stack(codes, dim=z.ndim - 1)

    def _decode(self, codes: Tensor) -> Tensor:
        axis = codes.ndim - len(self.code_shape)
        return sum(_level_latent(lv, c).float() for lv, c in zip(self.stack, codes.unbind(axis)))

    def _beam(self, z: Tensor) -> QuantizerOutput:
        """Beam search over the levels (see ``beam_size``); the best path's codes, decoded."""
        lead, d = z.shape[:-1], z.shape[-1]
        res = z.reshape(-1, 1, d).float()  # (n, beams, D): what each path leaves over
        n = res.shape[0]
        paths = torch.zeros(n, 1, 0, dtype=torch.long, device=z.device)
        with torch.autocast(device_type=z.device.type, enabled=False):  # the search in fp32 under any autocast
            for level in self.stack:
                b, k = res.shape[1], min(self.beam_size, level.codebook_size)
                cand = level.candidates(res.reshape(n * b, d), k).reshape(n, b * k)
                left = res.repeat_interleave(k, dim=1) - level._decode(cand).float()
                err = left.square().sum(-1)
                # stable ascending order: on equal errors the earlier path (lower codes) wins
                keep = torch.sort(err, dim=1, stable=True).indices[:, : self.beam_size]
                res = left.gather(1, keep[..., None].expand(-1, -1, d))
                grown = torch.cat([paths.repeat_interleave(k, dim=1), cand[..., None]], dim=-1)
                paths = grown.gather(1, keep[..., None].expand(-1, -1, grown.shape[-1]))
        codes = paths[:, 0]
        if self.shared_levels:  # one codebook: a cell's codes in any order decode alike (rounding chose among them)
            codes = codes.sort(dim=-1).values
        codes = codes.reshape(*lead, len(self.stack))
        counts = [code_histogram(c.reshape(-1), self.codebook_size) for c in codes.unbind(-1)]
        metrics = {f"perplexity/level{i}": perplexity(c) for i, c in enumerate(counts)}
        return QuantizerOutput(self._decode(codes).to(z.dtype), codes, {}, metrics)
