"""Genetic search over token ids through a decoder: the codes whose decoded media score best.

An encoder gives the codes nearest its latent, which need not be the codes whose
decoding is best by a measure the encoder never saw (a metric, a classifier, a user's
preference). :func:`evolve_codes` searches the code maps themselves: a population of
code maps, each generation scored on its decodings, parents picked by tournament,
children made by uniform crossover and mutation, the best ``elites`` kept unchanged.
Started from the encoder's codes, the result scores at least as well as they do.

For sign quantizers (LFQ, BSQ: each code is a bit pattern) crossover and mutation act
on the bits, so a mutation flips one sign of the latent, as in the genetic search of
EvoLFQ (vector-quantize-pytorch); for any other codebook they act on whole codes and a
mutation draws a new code uniformly. :func:`evolve_tokens` picks the mode, the codebook
and the decoder from a :class:`~tokenizers_vq.Tokenizer`.

All random draws come from one CPU generator seeded by ``seed``: the same call gives the
same codes on every machine (given a deterministic decoder and score).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenizers_vq.quantizers.base import check_number, evaluating

Decode = Callable[[Tensor], Tensor]
"""``codes (n, *shape) -> media (n, ...)``."""
Score = Callable[[Tensor, Tensor], Tensor]
"""``(media (n, ...), codes (n, *shape)) -> (n,)``, higher is better."""


@dataclass
class Evolution:
    """What :func:`evolve_codes` found.

    Attributes:
        codes: the best code map seen, ``(1, *shape)`` (a batch of one, ready to decode).
        score: its score.
        history: the best score after each generation (the starting population first),
            ``generations + 1`` values, never decreasing.
        population: the last generation, ``(population, *shape)``.
        scores: its scores, ``(population,)``.
    """

    codes: Tensor
    score: float
    history: list[float]
    population: Tensor
    scores: Tensor


class _Draws:
    """Random draws from one seeded CPU generator, moved to the codes' device."""

    def __init__(self, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device

    def uniform(self, shape: Sequence[int]) -> Tensor:
        return torch.rand(tuple(shape), generator=self.gen).to(self.device)

    def ints(self, high: int, shape: Sequence[int]) -> Tensor:
        return torch.randint(0, high, tuple(shape), generator=self.gen).to(self.device)


def _flip_masks(draws: _Draws, shape: Sequence[int], bits: int, rate: float) -> Tensor:
    """Int64 masks whose each of ``bits`` bits is set with probability ``rate``."""
    chosen = draws.uniform((*shape, bits)) < rate
    weights = torch.ones(bits, dtype=torch.int64, device=draws.device) << torch.arange(bits, device=draws.device)
    return (chosen.long() * weights).sum(-1)


def _mutate(codes: Tensor, draws: _Draws, size: int, bits: int | None, rate: float) -> Tensor:
    if bits is not None:
        return codes ^ _flip_masks(draws, codes.shape, bits, rate)
    return torch.where(draws.uniform(codes.shape) < rate, draws.ints(size, codes.shape), codes)


def _crossover(a: Tensor, b: Tensor, draws: _Draws, size: int, bits: int | None) -> Tensor:
    if bits is not None:  # a uniform integer below 2^bits has independent, fair bits
        take_a = draws.ints(size, a.shape)
        return (a & take_a) | (b & ~take_a)
    return torch.where(draws.uniform(a.shape) < 0.5, a, b)


def _scores(decode: Decode, score: Score, pop: Tensor, batch_size: int | None) -> Tensor:
    parts = []
    for chunk in pop.split(batch_size or len(pop)):
        with torch.no_grad():  # (scores only: no graph kept of the decodings)
            s = torch.as_tensor(score(decode(chunk), chunk))
        if s.dim() == 0 and len(chunk) == 1:  # a bare number for a chunk of one
            s = s.reshape(1)
        if s.shape != (len(chunk),):
            raise ValueError(f"score must give one value per code map, shape ({len(chunk)},); got {tuple(s.shape)}")
        parts.append(s.detach().to("cpu", torch.float64))
    out = torch.cat(parts)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(f"score gave NaN or infinity for {bad} of {len(out)} code maps; "
                         "return a finite value for each (higher is better)")
    return out


def _start(start: Tensor | None, shape: Sequence[int] | None, size: int, n: int, draws: _Draws,
           bits: int | None, rate: float) -> Tensor:
    if start is None:
        if shape is None:
            raise ValueError("evolve_codes needs start codes (n, *shape) or a shape for a random population")
        return draws.ints(size, (n, *shape))
    if start.is_floating_point() or start.is_complex() or start.dtype == torch.bool:
        raise TypeError(f"start must hold integer code ids, got {start.dtype}")
    if start.dim() < 2:
        raise ValueError(f"start must be code maps (n, *shape) with a batch dimension, got shape {tuple(start.shape)}"
                         " (add one with codes[None] or codes.unsqueeze(0))")
    if shape is not None and tuple(start.shape[1:]) != tuple(shape):
        raise ValueError(f"start's maps have shape {tuple(start.shape[1:])}, shape says {tuple(shape)}")
    if not 1 <= len(start) <= n:
        raise ValueError(f"start holds {len(start)} code maps; it must hold 1 to population={n}")
    if start.numel() and (start.min() < 0 or start.max() >= size):
        raise ValueError(f"start codes lie in [{int(start.min())}, {int(start.max())}], outside [0, {size}) "
                         "for this codebook_size")
    start = start.to(torch.int64)
    fill = start[torch.arange(n - len(start)) % len(start)]  # the rest: mutated copies of the given maps
    return torch.cat([start, _mutate(fill, draws, size, bits, rate)])


def evolve_codes(decode: Decode, score: Score, codebook_size: int, start: Tensor | None = None, *,
                 shape: Sequence[int] | None = None, bitwise: bool = False, population: int = 64,
                 generations: int = 50, mutation_rate: float = 0.02, tournament: int = 2, elites: int = 1,
                 batch_size: int | None = None, seed: int = 0, device: torch.device | str | None = None,
                 progress: bool = False) -> Evolution:
    """Search code maps for the best-scoring decoding.

    Args:
        decode: code maps ``(n, *shape)`` (int64) to media ``(n, ...)``.
        score: ``(media, codes) -> (n,)``, higher is better; must be finite.
        codebook_size: codes lie in ``[0, codebook_size)``.
        start: ``(m, *shape)`` code maps to start from (``m <= population``; the rest of the
            first generation are mutated copies of them), e.g. an encoder's codes; ``None``
            starts from uniform random codes of ``shape``.
        shape: the code map's shape without the batch dimension (needed without ``start``).
        bitwise: crossover and mutation on the bits of each code (``codebook_size`` a power
            of two: a sign quantizer's codes); otherwise on whole codes.
        population: code maps per generation (at least 2).
        generations: rounds of selection, crossover and mutation after the first scoring.
        mutation_rate: per bit (``bitwise``) or per code, the chance to flip it / draw it anew.
        tournament: contenders per parent choice (1: parents at random).
        elites: best maps carried into the next generation unchanged (0 to population - 1).
        batch_size: decode and score at most this many maps at a time (default: all at once).
        seed: seeds the one CPU generator every draw comes from.
        device: where the code maps live without ``start`` (default CPU); with it, its device.
        progress: show a tqdm bar over the generations.

    Returns:
        An :class:`Evolution`: the best map ``(1, *shape)`` and its score, the best score per
        generation, the last population and its scores. Each generation costs ``population``
        decodings (``elites`` of them repeated).

    Example:
        >>> target = torch.tensor([[3, 1, 4, 1, 5]])
        >>> found = evolve_codes(lambda c: c.float(), lambda x, c: -(x - target).abs().sum(-1),
        ...                      codebook_size=8, shape=(5,), population=32, generations=60)
        >>> found.codes.tolist(), found.score == 0
        ([[3, 1, 4, 1, 5]], True)
    """
    check_number("codebook_size", codebook_size, 1, integer=True)
    check_number("population", population, 2, integer=True)
    check_number("generations", generations, 0, integer=True)
    check_number("mutation_rate", mutation_rate, 0.0, 1.0)
    check_number("tournament", tournament, 1, integer=True)
    check_number("elites", elites, 0, population - 1, integer=True)
    if batch_size is not None:
        check_number("batch_size", batch_size, 1, integer=True)
    bits = None
    if bitwise:
        if codebook_size & (codebook_size - 1) or codebook_size > 2 ** 62:
            raise ValueError(f"bitwise search needs a codebook of 2^bits codes (bits <= 62), got {codebook_size}; "
                             "pass bitwise=False to mutate whole codes")
        bits = int(math.log2(codebook_size))
    device = start.device if start is not None else torch.device(device or "cpu")
    draws = _Draws(seed, device)
    pop = _start(start, shape, codebook_size, population, draws, bits, mutation_rate)
    scores = _scores(decode, score, pop, batch_size)
    best = int(scores.argmax())
    best_codes, best_score = pop[best : best + 1].clone(), float(scores[best])
    history = [best_score]
    rounds = range(generations)
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        rounds = tqdm(rounds, desc="evolve", unit="gen")
    n_children = population - elites
    for _ in rounds:  # (selection on the CPU, where the scores are; the maps stay on their device)
        order = torch.sort(scores, descending=True, stable=True).indices.to(device)
        contenders = torch.randint(0, population, (n_children, 2, tournament), generator=draws.gen)
        winners = contenders.gather(-1, scores[contenders].argmax(-1, keepdim=True)).squeeze(-1).to(device)
        children = _crossover(pop[winners[:, 0]], pop[winners[:, 1]], draws, codebook_size, bits)
        children = _mutate(children, draws, codebook_size, bits, mutation_rate)
        pop = torch.cat([pop[order[:elites]], children])
        scores = _scores(decode, score, pop, batch_size)
        best = int(scores.argmax())
        if scores[best] > best_score:
            best_codes, best_score = pop[best : best + 1].clone(), float(scores[best])
        history.append(best_score)
        if progress:
            rounds.set_postfix(best=f"{best_score:.4g}")
    return Evolution(best_codes, best_score, history, pop, scores)


def evolve_tokens(tokenizer, score: Score, start: Tensor, *, size: Sequence[int] | None = None,
                  **options) -> Evolution:
    """:func:`evolve_codes` through a tokenizer's decoder, from its codes ``start``
    (``(m, *grid, *code_shape)``, e.g. ``tokenizer.encode(x)`` of one item).

    The search is bitwise when the bottleneck's quantizers are sign quantizers (LFQ, BSQ); ``size``
    crops the decodings as :meth:`Tokenizer.decode` does; the tokenizer decodes in eval mode (each
    module's own mode back after). Options are :func:`evolve_codes`'s. Bottlenecks whose codes are not
    one per position are refused: a dynamic-length one, and multi-scale or hierarchical ones, which
    repeat a coarse code over the positions it covers and read one of them.

    Example:
        >>> from tokenizers_vq import QuantizerConfig, Tokenizer, TokenizerConfig
        >>> tok = Tokenizer(TokenizerConfig(quantizer=QuantizerConfig("lfq", {"num_bits": 8})))
        >>> photo = torch.rand(1, 3, 32, 32)
        >>> found = evolve_tokens(tok, lambda x, c: -(x - photo).square().mean((1, 2, 3)),
        ...                       tok.encode(photo), population=8, generations=2)
        >>> found.codes.shape, found.history[-1] >= found.history[0]
        (torch.Size([1, 2, 2]), True)
    """
    from tokenizers_vq.quantizers.base import Quantizer  # noqa: PLC0415
    from tokenizers_vq.quantizers.lfq import LFQ  # noqa: PLC0415

    if tokenizer.is_dynamic:
        raise ValueError("evolve_tokens searches fixed code maps; a dynamic-length tokenizer's PackedCodes "
                         "cannot be mutated position by position (use a tokenizer without a dynamic bottleneck)")
    if not tokenizer.quantizer.positionwise:
        raise ValueError(f"evolve_tokens changes each position's code on its own; this {type(tokenizer.quantizer).__name__} "
                         "repeats a coarse code over several positions and decodes one of them, so most changes would "
                         "do nothing (use a tokenizer whose bottleneck codes each position: vq, fsq, lfq, residual, ...)")
    if "bitwise" in options:
        raise TypeError("evolve_tokens picks bitwise from the tokenizer's bottleneck; "
                        "call evolve_codes to choose it yourself")
    leaves = [m for m in tokenizer.quantizer.modules()  # (residual levels, groups: the quantizers inside)
              if isinstance(m, Quantizer) and not any(isinstance(c, Quantizer) for c in m.modules() if c is not m)]
    with evaluating(tokenizer):
        return evolve_codes(lambda codes: tokenizer.decode(codes, size), score, tokenizer.codebook_size, start,
                            bitwise=all(isinstance(m, LFQ) for m in leaves), **options)
