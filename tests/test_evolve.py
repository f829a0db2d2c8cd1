"""Genetic search over code maps: it finds optima of known problems, never loses the start,
reports the map it scored, repeats for a seed, and refuses bad input by name."""

import pytest
import torch

from tokenizers_vq import QuantizerConfig, Tokenizer, TokenizerConfig
from tokenizers_vq.evolve import evolve_codes, evolve_tokens


def as_float(codes):
    return codes.float()


def ones_count(media, codes):
    """Set bits over the whole map (a sum of popcounts)."""
    bits = (codes[..., None] >> torch.arange(10)) & 1
    return bits.flatten(1).sum(1).float()


def test_finds_a_target_map_by_whole_codes():
    target = torch.tensor([[7, 0, 3, 3, 6, 1, 2, 5]])
    found = evolve_codes(as_float, lambda x, c: -(x - target).abs().sum(1), 8, shape=(8,),
                         population=48, generations=150, seed=1)
    assert found.codes.tolist() == target.tolist() and found.score == 0
    assert found.codes.dtype == torch.int64


def test_bitwise_search_flips_signs_to_all_ones():
    found = evolve_codes(as_float, ones_count, 1024, torch.zeros(1, 4, dtype=torch.long), bitwise=True,
                         population=32, generations=100)  # about 30-45 generations are needed
    assert found.score == 40 and (found.codes == 1023).all()
    assert found.history[0] < 40


def test_reported_map_is_the_one_scored_and_history_never_falls():
    calls = []

    def score(x, c):
        assert not torch.is_grad_enabled()  # decodings and scores build no graph
        calls.append(c.clone())
        return -(x - 2.5).square().flatten(1).sum(1)

    found = evolve_codes(as_float, score, 6, shape=(3, 2), population=10, generations=7, seed=3)
    assert found.codes.shape == (1, 3, 2) and found.population.shape == (10, 3, 2)
    with torch.no_grad():
        assert found.score == pytest.approx(float(score(as_float(found.codes), found.codes)))
    assert torch.is_grad_enabled()
    assert len(found.history) == 8 and all(b >= a for a, b in zip(found.history, found.history[1:]))
    assert found.history[-1] == found.score == max(found.history)
    assert len(calls) == 8 + 1 and all(len(c) == 10 for c in calls[:8])  # one scoring per generation (+ the check)
    with torch.no_grad():
        assert torch.equal(found.scores, score(as_float(found.population), found.population).double())


def test_never_worse_than_the_start():
    start = torch.tensor([[5, 5, 5]])  # the optimum of this score
    found = evolve_codes(as_float, lambda x, c: -(x - 5).abs().sum(1), 16, start, mutation_rate=0.5,
                         population=8, generations=5)
    assert torch.equal(found.codes, start) and found.score == 0
    assert torch.equal(found.population[0], start[0])  # the elite carried unchanged


def test_without_elites_the_best_seen_is_still_kept():
    start = torch.tensor([[5, 5, 5]])
    found = evolve_codes(as_float, lambda x, c: -(x - 5).abs().sum(1), 16, start, mutation_rate=1.0,
                         elites=0, population=4, generations=3)
    assert torch.equal(found.codes, start) and found.score == 0


def test_same_seed_same_result_and_seeds_differ():
    kw = dict(shape=(5,), population=12, generations=6, mutation_rate=0.2)
    score = lambda x, c: -(x - 3).abs().sum(1)  # noqa: E731
    a = evolve_codes(as_float, score, 16, seed=4, **kw)
    b = evolve_codes(as_float, score, 16, seed=4, **kw)
    c = evolve_codes(as_float, score, 16, seed=5, **kw)
    assert torch.equal(a.population, b.population) and a.history == b.history
    assert not torch.equal(a.population, c.population)


def test_mutation_rate_is_per_bit_and_per_code():
    start = torch.zeros(1, 4000, dtype=torch.long)
    found = evolve_codes(as_float, lambda x, c: torch.zeros(len(c)), 256, start, bitwise=True, population=2,
                         generations=0, mutation_rate=0.1)
    flipped = ((found.population[1][:, None] >> torch.arange(8)) & 1).float().mean()
    assert abs(float(flipped) - 0.1) < 0.01
    found = evolve_codes(as_float, lambda x, c: torch.zeros(len(c)), 256, start, population=2, generations=0,
                         mutation_rate=0.1)
    changed = (found.population[1] != 0).float().mean()  # a redraw may give code 0 again: 0.1 * 255/256
    assert abs(float(changed) - 0.1 * 255 / 256) < 0.015


def test_bitwise_crossover_mixes_the_bits_of_a_code():
    start = torch.tensor([[0] * 50, [1023] * 50])  # complementary parents, no mutation
    kw = dict(population=40, generations=1, mutation_rate=0.0, elites=0, tournament=1)  # parents at random
    found = evolve_codes(as_float, lambda x, c: torch.zeros(len(c)), 1024, start, bitwise=True, **kw)
    bits = ((found.population[..., None] >> torch.arange(10)) & 1).float()  # (child, position, bit)
    crossed = ~((found.population == 0).all(1) | (found.population == 1023).all(1))  # two different parents
    assert 10 <= int(crossed.sum()) <= 30
    mixed = (bits[crossed].mean(-1) > 0) & (bits[crossed].mean(-1) < 1)  # codes that are neither parent's
    assert mixed.float().mean() > 0.95 and abs(float(bits[crossed].mean()) - 0.5) < 0.05
    whole = evolve_codes(as_float, lambda x, c: torch.zeros(len(c)), 1024, start, **kw)
    assert set(whole.population.unique().tolist()) == {0, 1023}  # whole codes: each from one parent
    assert not ((whole.population == 0).all(1) | (whole.population == 1023).all(1)).all()


def test_a_bare_number_scores_a_map_of_one():
    for number in (lambda x: float(x.sum()), lambda x: x.sum()):  # a float, a 0-dim tensor
        found = evolve_codes(as_float, lambda x, c: number(x), 4, shape=(3,), population=4, generations=2,
                             batch_size=1)
        assert found.score == float(found.codes.sum()) and len(found.history) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_codes_give_the_cpu_search():
    score = lambda x, c: -(x - 3).abs().flatten(1).sum(1)  # noqa: E731
    for bitwise in (False, True):
        kw = dict(bitwise=bitwise, population=12, generations=5, mutation_rate=0.2, seed=2)
        cpu = evolve_codes(as_float, score, 16, torch.zeros(1, 6, dtype=torch.long), **kw)
        gpu = evolve_codes(as_float, score, 16, torch.zeros(1, 6, dtype=torch.long, device="cuda"), **kw)
        assert gpu.population.is_cuda and torch.equal(gpu.population.cpu(), cpu.population)
        assert gpu.history == cpu.history


def test_batch_size_scores_in_chunks():
    sizes = []

    def score(x, c):
        sizes.append(len(c))
        return x.sum(1)

    evolve_codes(as_float, score, 4, shape=(2,), population=10, generations=1, batch_size=4)
    assert sizes == [4, 4, 2, 4, 4, 2]


@pytest.mark.parametrize("kw, message", [
    (dict(population=1), "population"),
    (dict(elites=8), "elites"),
    (dict(mutation_rate=1.5), "mutation_rate"),
    (dict(tournament=0), "tournament"),
    (dict(codebook_size=1000, bitwise=True), "2\\^bits"),
    (dict(start=torch.tensor([[0, 9]])), "outside \\[0, 8\\)"),
    (dict(start=torch.tensor([0, 1])), "batch dimension"),
    (dict(start=torch.zeros(9, 2, dtype=torch.long)), "1 to population=8"),
    (dict(start=None, shape=None), "needs start codes"),
])
def test_bad_arguments_are_refused_by_name(kw, message):
    args = dict(codebook_size=8, start=torch.zeros(1, 2, dtype=torch.long), population=8, generations=1) | kw
    with pytest.raises(ValueError, match=message):
        evolve_codes(as_float, lambda x, c: x.sum(1), **args)


def test_float_start_and_bad_scores_are_refused():
    with pytest.raises(TypeError, match="integer code ids"):
        evolve_codes(as_float, lambda x, c: x.sum(1), 8, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="one value per code map"):
        evolve_codes(as_float, lambda x, c: x, 8, shape=(2,), population=4)
    with pytest.raises(ValueError, match="NaN or infinity for 4 of 4"):
        evolve_codes(as_float, lambda x, c: x.sum(1) * float("nan"), 8, shape=(2,), population=4)


def small_tokenizer(kind, options, levels=1):
    """A random-weight image tokenizer; negative ``levels``: that many channel groups instead."""
    torch.manual_seed(0)
    shape = {"levels": levels} if levels > 0 else {"groups": -levels}
    return Tokenizer(TokenizerConfig(quantizer=QuantizerConfig(kind, options, **shape)))


def mse_to(target):
    return lambda x, c: -(x - target).square().flatten(1).mean(1)


@pytest.mark.parametrize("kind, options, levels, bitwise", [
    ("lfq", {"num_bits": 6}, 1, True),
    ("lfq", {"num_bits": 4, "spherical": True}, 2, True),
    ("lfq", {"num_bits": 4}, -2, True),  # two channel groups
    ("vq", {"codebook_size": 64}, 1, False),
    ("fsq", {"levels": [4, 4, 4]}, 1, False),
])
def test_tokens_search_through_the_tokenizer(kind, options, levels, bitwise, monkeypatch):
    import tokenizers_vq.evolve as ev

    seen = {}
    real = ev.evolve_codes
    monkeypatch.setattr(ev, "evolve_codes", lambda *a, **k: seen.update(k) or real(*a, **k))
    tok = small_tokenizer(kind, options, levels).train()
    photo = torch.rand(1, 3, 40, 40)
    start = tok.encode(photo)
    start_score = float(mse_to(photo[..., :40, :40])(tok.decode(start, (40, 40)), start)[0])
    found = evolve_tokens(tok, mse_to(photo), start, size=(40, 40), population=6, generations=3)
    assert seen["bitwise"] is bitwise
    assert found.codes.shape == start.shape and found.score >= start_score - 1e-6
    assert found.history[0] >= start_score - 1e-6  # the start is in the first generation (scored in a batch)
    assert found.scores.shape == (6,)
    assert int(found.population.max()) < tok.codebook_size
    assert tok.decode(found.codes, (40, 40)).shape == photo.shape
    assert tok.training  # its mode given back


def test_tokens_search_refuses_what_it_cannot_search():
    tok = small_tokenizer("lfq", {"num_bits": 6})
    with pytest.raises(TypeError, match="picks bitwise"):
        evolve_tokens(tok, mse_to(0), torch.zeros(1, 2, 2, dtype=torch.long), bitwise=False)
    with pytest.raises(ValueError, match="outside \\[0, 64\\)"):
        evolve_tokens(tok, mse_to(0), torch.full((1, 2, 2), 64), generations=1)
    multiscale = small_tokenizer("multiscale", {"codebook_size": 64, "scales": [1, 2]})
    with pytest.raises(ValueError, match="repeats a coarse code"):
        evolve_tokens(multiscale, mse_to(0), torch.zeros(1, 2, 2, dtype=torch.long), generations=1)
