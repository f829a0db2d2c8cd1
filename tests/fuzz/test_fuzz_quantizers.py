"""Every quantizer of the contract suite on random latents and random codes.

The property: a call either returns a result that keeps the contract (shapes, the
latent's dtype, int64 codes in ``[0, codebook_size)``, finite outputs and state for
finite input) or raises a ValueError that names the problem; never another exception.
With ``check_finite`` off, a latent holding NaN or Inf (or values past the magnitude
limit) only has to give no exception other than ValueError.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tokenizers_vq.quantizers.base import Quantizer

_spec = importlib.util.spec_from_file_location(
    "quantizer_contract", Path(__file__).parents[1] / "quantizers" / "test_contract.py"
)
contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(contract)
QUANTIZERS = contract.QUANTIZERS

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
NOT_FLOATS = [torch.int64, torch.int32, torch.uint8, torch.bool]
SCALES = [1.0, 1e-40, 1e-20, 1e-3, 1e4, 1e10, 1e20, 1e30, 3e38]
INJECT = [None, float("nan"), float("inf"), float("-inf")]
# refusals a quantizer may add to the base checks, with the problem they name
OWN_REFUSALS = r"magnitude|needs at least one spatial axis"

_built: dict[str, Quantizer] = {}


def fresh(name: str, check_finite: bool = True) -> Quantizer:
    """A new copy of the contract suite's quantizer (built once, seed 0)."""
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = QUANTIZERS[name]()
    q = copy.deepcopy(_built[name])
    for m in q.modules():
        if isinstance(m, Quantizer):
            m.check_finite = check_finite
    torch.manual_seed(0)  # dropout, k-means and restarts draw from it: an example replays exactly
    return q


@dataclass(frozen=True)
class LatentSpec:
    """A latent ``(*lead, dim + dim_offset)``: normal (times ``scale``) or all equal to
    ``scale`` times ``fill``, with ``inject`` written at flat index ``at``, then cast to
    ``dtype`` (past a float dtype's range: +-Inf; below it: zero or denormal; an
    integer dtype gets the values clamped to +-100)."""

    lead: tuple[int, ...] = (2, 3)
    dim_offset: int = 0
    dtype: torch.dtype = torch.float32
    scale: float = 1.0
    fill: float | None = None
    inject: float | None = None
    at: int = 0
    seed: int = 0

    def tensor(self, dim: int) -> torch.Tensor:
        shape = (*self.lead, max(1, dim + self.dim_offset))
        if self.fill is None:
            z = torch.randn(shape, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        else:
            z = torch.full(shape, self.fill, dtype=torch.float64)
        z = z * self.scale
        if self.inject is not None and z.numel():
            z.view(-1)[self.at % z.numel()] = self.inject
        if self.dtype.is_floating_point:
            return z.to(self.dtype)
        return z.nan_to_num(0.0, 0.0, 0.0).clamp(-100, 100).to(self.dtype)


def leads() -> st.SearchStrategy[tuple[int, ...]]:
    """Leading shapes ``(B, *S)`` of 1 to 4 axes of sizes 1 to 3; one in ten has a 0."""
    return st.tuples(st.lists(st.integers(1, 3), min_size=1, max_size=4), st.integers(0, 9), st.integers(0, 3)).map(
        lambda t: tuple(0 if (t[1] == 0 and i == t[2] % len(t[0])) else s for i, s in enumerate(t[0]))
    )


latent_specs = st.builds(
    LatentSpec,
    lead=leads(),
    dim_offset=st.sampled_from([0, 0, 0, 1, -1]),
    dtype=st.sampled_from(FLOATS + NOT_FLOATS),
    scale=st.sampled_from(SCALES),
    fill=st.sampled_from([None, None, 1.0, -1.0, 0.0]),
    inject=st.sampled_from(INJECT),
    at=st.integers(0, 200),
    seed=st.integers(0, 2**32 - 1),
)


def refusal(q: Quantizer, z: torch.Tensor, check_finite: bool) -> str | None:
    """What the base checks must name for this latent, or ``None`` when it is valid."""
    if not z.is_floating_point():
        return "floating-point"
    if z.shape[-1] != q.dim:
        return "last dimension"
    if z.numel() == 0:
        return "empty"
    if check_finite and not torch.isfinite(z).all():
        return "NaN or Inf"
    return None


def assert_finite_state(q: Quantizer) -> None:
    bad = [k for k, v in q.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"non-finite quantizer state after the call: {bad}"


def assert_codes(q: Quantizer, codes: torch.Tensor, lead: tuple[int, ...]) -> None:
    assert codes.dtype == torch.int64
    assert codes.shape == (*lead, *q.code_shape)
    assert int(codes.min()) >= 0 and int(codes.max()) < q.codebook_size, (int(codes.min()), int(codes.max()))


@pytest.mark.parametrize("name", QUANTIZERS)
@given(
    spec=latent_specs,
    train=st.booleans(),
    op=st.sampled_from(["forward", "encode"]),
    autocast=st.booleans(),
    check=st.booleans().map(lambda b: not b),
)
@example(spec=LatentSpec(scale=1e30), train=True, op="forward", autocast=False, check=True).via(
    "1e30: squared distances overflow float32 (inf losses, codebook EMA poisoned); refused"
)
@example(spec=LatentSpec(scale=1e20), train=False, op="encode", autocast=False, check=True).via(
    "1e20: the norm in the rotation trick and residual levels overflow; refused, not a misleading NaN message"
)
@example(spec=LatentSpec(lead=(1,), inject=float("nan")), train=False, op="forward", autocast=False, check=False).via(
    "NaN with check_finite off: FSQ's codes came from a NaN cast to int64 (IndexError in its usage histogram)"
)
@example(spec=LatentSpec(dtype=torch.float16), train=False, op="forward", autocast=True, check=True).via(
    "fp16 in a CPU bf16 autocast region: torch.cat of fp16 tensors raised RuntimeError in grouped/hierarchical"
)
def test_random_latents(name: str, spec: LatentSpec, train: bool, op: str, autocast: bool, check: bool):
    q = fresh(name, check).train(train)
    z = spec.tensor(q.dim)
    expected = refusal(q, z, check)
    finite = bool(z.is_floating_point() and z.numel() and torch.isfinite(z).all())
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
            out = q(z) if op == "forward" else q.encode(z)
    except ValueError as e:
        assert re.search(expected or OWN_REFUSALS, str(e)), f"ValueError does not name the problem ({expected}): {e}"
        return
    assert expected is None, f"{op} accepted a latent it must refuse ({expected})"
    if not finite:  # check_finite off: no exception is all that is asked
        return
    codes = out if op == "encode" else out.codes
    assert_codes(q, codes, tuple(z.shape[:-1]))
    if not check:  # past the magnitude limit, losses may overflow
        return
    assert_finite_state(q)
    if op == "forward":
        assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
        assert torch.isfinite(out.quantized).all()
        named = {**out.losses, **out.metrics}
        assert all(v.ndim == 0 and torch.isfinite(v) for v in named.values()), named
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        rec = q.decode(codes)
    assert rec.shape == z.shape and torch.isfinite(rec).all()
    if op == "forward" and not train:
        assert torch.equal(rec.to(z.dtype), out.quantized), "decode(codes) differs from forward's quantized in eval"


@dataclass(frozen=True)
class CodeSpec:
    """Codes ``(*lead, *trailing)`` in range, the trailing shape the quantizer's
    ``code_shape`` changed by ``trailing`` ("right", "drop" its last axis, "add" an axis
    of size ``extra``, "resize" its last axis by ``extra``), with ``wrong`` written at
    flat index ``at``, cast to ``dtype`` (narrower integers wrap, as a cast does)."""

    lead: tuple[int, ...] = (2, 3)
    trailing: str = "right"
    extra: int = 1
    wrong: int | None = None
    at: int = 0
    dtype: torch.dtype = torch.int64
    seed: int = 0

    def tensor(self, q: Quantizer) -> torch.Tensor:
        trail = list(q.code_shape)
        if self.trailing == "drop" and trail:
            trail = trail[:-1]
        elif self.trailing == "add":
            trail = [*trail, abs(self.extra)]
        elif self.trailing == "resize" and trail:
            trail[-1] = max(1, trail[-1] + self.extra)
        gen = torch.Generator().manual_seed(self.seed)
        codes = torch.randint(0, q.codebook_size, (*self.lead, *trail), generator=gen)
        if self.wrong is not None and codes.numel():
            codes.view(-1)[self.at % codes.numel()] = self.wrong
        return codes.to(self.dtype)


code_specs = st.builds(
    CodeSpec,
    lead=leads(),
    trailing=st.sampled_from(["right", "right", "right", "drop", "add", "resize"]),
    extra=st.sampled_from([1, -1, 2]),
    wrong=st.sampled_from([None, None, -1, 2**40, 64, 32, 1024]),
    at=st.integers(0, 200),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]),
    seed=st.integers(0, 2**32 - 1),
)


def code_refusal(q: Quantizer, c: torch.Tensor) -> str | None:
    """What the base checks must name for these codes, or ``None`` when they are valid."""
    cs = q.code_shape
    if c.dtype.is_floating_point or c.dtype == torch.bool:
        return "integer tensor"
    if c.ndim < 1 + len(cs) or tuple(c.shape[c.ndim - len(cs) :]) != cs:
        return "codes must be"
    if c.numel() == 0:
        return "empty"
    if int(c.min()) < 0 or int(c.max()) >= q.codebook_size:
        return "out of range"
    return None


@pytest.mark.parametrize("name", QUANTIZERS)
@given(spec=code_specs)
def test_random_codes_decode(name: str, spec: CodeSpec):
    q = fresh(name).eval()
    codes = spec.tensor(q)
    expected = code_refusal(q, codes)
    try:
        rec = q.decode(codes)
    except ValueError as e:
        assert re.search(expected or OWN_REFUSALS, str(e)), f"ValueError does not name the problem ({expected}): {e}"
        return
    assert expected is None, f"decode accepted codes it must refuse ({expected})"
    lead = codes.shape[: codes.ndim - len(q.code_shape)]
    assert rec.shape == (*lead, q.dim) and rec.is_floating_point() and torch.isfinite(rec).all()
