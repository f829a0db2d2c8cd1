"""The contract every quantizer keeps, parametrised over quantizer x latent rank x precision."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizers_vq import FSQ, LFQ, GroupedQuantizer, ResidualQuantizer, SimVQ, VectorQuantizer
from tokenizers_vq.quantizers import (
    FSP,
    BinaryMapper,
    HierarchicalQuantizer,
    IBQ,
    LatentQuantizer,
    MultiScaleResidualQuantizer,
    ProjectedCodebookVQ,
    RandomProjectionQuantizer,
    shrink_codebook,
)
from tokenizers_vq.quantizers.base import rows_of_items
from tokenizers_vq.quantizers.sharded import ShardedVectorQuantizer

D = 16
QUANTIZERS = {
    "sharded-vq-one-rank": lambda: ShardedVectorQuantizer(D, 64, dead_code_threshold=0.5),
    "vq-ema": lambda: VectorQuantizer(D, 64),
    "vq-ema-cosine-factorised-kmeans": lambda: VectorQuantizer(
        D, 64, codebook_dim=4, metric="cosine", kmeans_init=True, kmeans_iters=3
    ),
    "vq-learned-rotation": lambda: VectorQuantizer(D, 64, learning="loss", estimator="rotation"),
    "vq-ema-nsvq": lambda: VectorQuantizer(D, 64, estimator="nsvq"),
    "vq-learned-diveq": lambda: VectorQuantizer(D, 64, learning="loss", estimator="diveq"),
    "simvq-diveq": lambda: SimVQ(D, 64, estimator="diveq"),
    "vq-learned-orthogonal": lambda: VectorQuantizer(D, 64, learning="loss", orthogonal_weight=10.0, orthogonal_sample=32),
    "vq-diversity-stochastic": lambda: VectorQuantizer(D, 64, diversity_weight=0.5, diversity_sample=16,
                                                       sample_temperature=0.5),
    "vq-learned-affine-kmeans": lambda: VectorQuantizer(D, 64, learning="loss", affine=True, kmeans_init=True),
    "simvq": lambda: SimVQ(D, 64),
    "simvq-factorised": lambda: SimVQ(D, 128, codebook_dim=8),
    "simvq-rotation": lambda: SimVQ(D, 64, estimator="rotation"),
    "residual-simvq": lambda: ResidualQuantizer([SimVQ(D, 32) for _ in range(3)]),
    "multiscale-var": lambda: MultiScaleResidualQuantizer(D, 64, scales=(1, 2, 3, 5, 6)),
    "ibq": lambda: IBQ(D, 64),
    "ibq-factorised": lambda: IBQ(D, 128, codebook_dim=8),
    "random-projection": lambda: RandomProjectionQuantizer(D, 256, codebook_dim=8),
    "fsq": lambda: FSQ(D, [8, 5, 5, 5]),
    "fsq-no-projection": lambda: FSQ(4, [7, 6, 5, 4]),
    "fsq-symmetric-noise-dropout": lambda: FSQ(D, [8, 5, 5, 5], bound="symmetric", noise_dropout=0.5),
    "fsq-paper-bound": lambda: FSQ(D, [8, 6, 5], bound="paper"),
    "fsp": lambda: FSP(D, [8, 5, 5, 5]),
    "fsp-normal-inverse-half-perturbed": lambda: FSP(D, [7, 6, 5], cdf="normal", inverse_cdf=True, perturb=0.5),
    "fsp-cauchy-no-projection": lambda: FSP(3, [4, 4, 4], cdf="cauchy", var_weight=0.0),
    "binary-mapper": lambda: BinaryMapper(D, 6),
    "lfq": lambda: LFQ(D, 10),
    "bsq": lambda: LFQ(D, 12, spherical=True),
    "residual-vq-dropout": lambda: ResidualQuantizer([VectorQuantizer(D, 32) for _ in range(3)], dropout=0.5),
    "residual-fsq": lambda: ResidualQuantizer([FSQ(D, [5, 5, 5]) for _ in range(2)]),
    "residual-vq-shared-codebook": lambda: ResidualQuantizer([VectorQuantizer(D, 32)], shared_levels=3),
    "residual-vq-beam": lambda: ResidualQuantizer([VectorQuantizer(D, 32) for _ in range(3)], beam_size=3),
    "residual-vq-beam-factorised": lambda: ResidualQuantizer([VectorQuantizer(D, 32, codebook_dim=4) for _ in range(2)],
                                                             beam_size=2),
    "grouped-lfq": lambda: GroupedQuantizer([LFQ(D // 2, 6) for _ in range(2)]),
    "grouped-residual-vq": lambda: GroupedQuantizer(
        [ResidualQuantizer([VectorQuantizer(D // 2, 16) for _ in range(2)]) for _ in range(2)]
    ),
    "projected-vq-features": lambda: ProjectedCodebookVQ(D, 64, features=torch.randn(256, 24), kmeans_iters=3),
    "projected-vq-self-init-mlp": lambda: ProjectedCodebookVQ(
        D, 64, projector="mlp", metric="cosine", init_samples=64, init_batches=2, kmeans_iters=3
    ),
    "hierarchical-vq": lambda: HierarchicalQuantizer(VectorQuantizer(D, 64), VectorQuantizer(D, 64)),
    "hierarchical-residual-fsq": lambda: HierarchicalQuantizer(
        ResidualQuantizer([FSQ(D, [5, 5, 5]) for _ in range(2)]), ResidualQuantizer([FSQ(D, [5, 5, 5]) for _ in range(2)])
    ),
    "latent": lambda: LatentQuantizer(D, 10),
    "shrunk-vq": lambda: shrink_codebook(VectorQuantizer(D, 256), 32, iters=3)[0],
}
SHAPES = {"1d": (2, 9), "2d": (2, 5, 6), "3d": (2, 3, 4, 5)}
PRECISIONS = ["fp32", "bf16-autocast"]


def make(name: str):
    torch.manual_seed(0)
    q = QUANTIZERS[name]()
    return q.dim, q


def latent(dim: int, lead: tuple[int, ...], requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*lead, dim, requires_grad=requires_grad)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("rank", SHAPES)
@pytest.mark.parametrize("name", QUANTIZERS)
def test_contract(name: str, rank: str, precision: str):
    dim, q = make(name)
    lead = SHAPES[rank]
    z = latent(dim, lead, requires_grad=True)

    # training forward: shapes, dtypes, code range, finite named losses and metrics
    q.train()
    with autocast(precision):
        out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.codes.shape == (*lead, *q.code_shape) and out.codes.dtype == torch.int64
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < q.codebook_size
    assert all(torch.isfinite(v) and v.ndim == 0 for v in [*out.losses.values(), *out.metrics.values()])

    # gradients reach z (through the estimator and the losses)
    w = torch.randn_like(z)
    ((out.quantized * w).sum() + out.total_loss()).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0

    # eval: decode(encode(z)) is exactly forward(z).quantized
    q.eval()
    zz = z.detach()
    with autocast(precision), torch.no_grad():
        codes = q.encode(zz)
        rec = q.decode(codes)
        out_eval = q(zz)
    assert torch.equal(codes, out_eval.codes)
    assert torch.equal(rec.to(zz.dtype), out_eval.quantized)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_state_dict_roundtrip_through_safetensors(name: str, tmp_path):
    dim, q = make(name)
    q.train()
    for _ in range(3):  # move EMA buffers, k-means init, restarts away from their initial values
        q(latent(dim, (4, 32)))
    q.eval()
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, tmp_path / "q.safetensors")
    torch.manual_seed(123)  # a differently initialised twin
    twin = QUANTIZERS[name]()
    twin.load_state_dict(load_file(tmp_path / "q.safetensors"))
    twin.eval()
    z = latent(dim, (3, 11))
    assert torch.equal(twin.encode(z), q.encode(z))
    assert torch.equal(twin(z).quantized, q(z).quantized)


@pytest.mark.parametrize("scale", [0.0, 1e4])
@pytest.mark.parametrize("name", QUANTIZERS)
def test_finite_on_zeros_and_huge_latents(name: str, scale: float):
    dim, q = make(name)
    z = (latent(dim, (2, 8, 8)) * scale).requires_grad_()
    for train in (True, False):
        q.train(train)
        out = q(z)
        assert torch.isfinite(out.quantized).all()
        assert all(torch.isfinite(v) for v in [*out.losses.values(), *out.metrics.values()])
    out = q.train()(z)
    (out.quantized.sum() + out.total_loss()).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", QUANTIZERS)
def test_bad_input_raises_named_value_error(name: str):
    dim, q = make(name)
    good = latent(dim, (2, 4))
    bad_latents = {
        "last dimension": latent(dim + 1, (2, 4)),
        "floating-point": torch.ones(2, 4, dim, dtype=torch.int64),
        "NaN or Inf": good.clone().index_fill_(1, torch.tensor([2]), float("nan")),
        "empty": torch.zeros(0, 4, dim),
        "at least 2 axes": torch.randn(dim),
    }
    inf = good.clone()
    inf[0, 0, 0] = float("inf")
    bad_latents["NaN or Inf "] = inf
    for message, z in bad_latents.items():
        for call in (q, q.encode):
            with pytest.raises(ValueError, match=message.strip()):
                call(z)
    codes = q.encode(good)
    too_big = codes.clone()
    too_big.view(-1)[0] = q.codebook_size
    negative = codes.clone()
    negative.view(-1)[-1] = -1
    for message, c in {
        "out of range": too_big,
        "out of range ": negative,
        "integer tensor": codes.float(),
        "empty": codes[:0],
    }.items():
        with pytest.raises(ValueError, match=message.strip()):
            q.decode(c)
    if q.code_shape:
        with pytest.raises(ValueError, match="codes must be"):
            q.decode(codes[..., 0])


@pytest.mark.parametrize("name", ["vq-ema", "vq-learned-rotation", "fsq", "bsq", "residual-vq-dropout", "grouped-lfq"])
def test_training_forward_compiles_without_graph_breaks(name: str):
    """fullgraph=True fails on any graph break: no .item(), no data-dependent Python
    branch, i.e. no host synchronisation in the training forward."""
    dim, q = make(name)
    q.train()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    z = latent(dim, (2, 6, 6), requires_grad=True)
    out = compiled(z)
    (out.quantized.sum() + out.total_loss()).backward()
    assert out.codes.shape == (2, 6, 6, *q.code_shape)
    assert torch.isfinite(z.grad).all()


def test_vq_compiles_with_inductor_and_matches_eager():
    torch._dynamo.reset()  # its own frame cache: compiles of the same forward in earlier tests count to the recompile limit
    dim, q = make("vq-ema")
    q.eval()
    z = latent(dim, (4, 8, 8))
    eager = q(z)
    compiled = torch.compile(q, fullgraph=True)(z)
    assert torch.equal(compiled.codes, eager.codes)
    torch.testing.assert_close(compiled.quantized, eager.quantized)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", QUANTIZERS)
def test_half_inputs_without_autocast(name: str, dtype: torch.dtype):
    """fp32 weights (projections, codebooks) and a half-precision latent, outside
    autocast: the output keeps the input's dtype, codes are in range, and they are the
    codes of the same values in fp32 (the search runs in the weights' precision)."""
    dim, q = make(name)
    z = latent(dim, SHAPES["2d"]).to(dtype)
    q.train()
    out = q(z)  # training forward (statistics, k-means init) in half
    assert out.quantized.dtype == dtype and torch.isfinite(out.quantized.float()).all()
    q.eval()
    codes = q.encode(z)
    assert codes.shape == (*SHAPES["2d"], *q.code_shape)
    assert int(codes.min()) >= 0 and int(codes.max()) < q.codebook_size
    assert q.decode(codes).shape == z.shape
    same = (codes == q.encode(z.float())).float().mean()
    assert same == 1, f"only {same:.1%} of half-input codes equal the fp32 ones"


@pytest.mark.parametrize("name", QUANTIZERS)
def test_masked_positions_count_nowhere(name: str):
    """With a mask, the real positions are quantized exactly as if they came alone (codes,
    quantized values, losses, metrics and the codebook state after a training step), and
    padded positions pass through with code -1."""
    dim, q = make(name)
    if not q.positionwise:
        with pytest.raises(ValueError, match="cannot leave positions out"):
            q(latent(dim, (2, 4, 4)), mask=torch.ones(2, 4, 4, dtype=torch.bool))
        return
    _, alone = make(name)  # same seed, same initial state
    z = latent(dim, (2, 9), requires_grad=True)
    mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    q.train(), alone.train()
    torch.manual_seed(1)
    out = q(z, mask=mask)
    torch.manual_seed(1)
    with rows_of_items(alone, torch.tensor([0] * 9 + [1] * 4), 2):  # per-item randomness drawn per item
        ref = alone(z.detach()[mask].unsqueeze(0))
    assert torch.equal(out.codes[mask], ref.codes[0]) and bool((out.codes[~mask] == -1).all())
    torch.testing.assert_close(out.quantized[mask], ref.quantized[0])
    assert torch.equal(out.quantized[~mask], z[~mask])
    assert out.losses.keys() == ref.losses.keys()
    for key in (*out.losses, *out.metrics):
        torch.testing.assert_close((out.losses | out.metrics)[key], (ref.losses | ref.metrics)[key])
    for (k, a), (_, b) in zip(q.state_dict().items(), alone.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{k} saw the padding"
    if out.losses:
        out.total_loss().backward()
        assert z.grad[~mask].abs().sum() == 0  # padding gets no loss gradient
    q.eval()
    zz = z.detach()
    assert torch.equal(q.encode(zz, mask=mask)[mask], q.encode(zz[mask].unsqueeze(0))[0])
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape \\(2, 9\\)"):
        q(z, mask=mask.float())
    padded = zz.clone()
    padded[~mask] = float("nan")  # padding of any value, never looked at
    assert torch.equal(q.encode(padded, mask=mask), q.encode(zz, mask=mask))
    assert torch.equal(q(padded, mask=mask).quantized[mask], q(zz, mask=mask).quantized[mask])
    if getattr(q, "check_finite", True):
        padded[0, 0] = float("nan")  # a real position is still checked
        with pytest.raises(ValueError, match="NaN"):
            q.encode(padded, mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", QUANTIZERS)
def test_low_precision_weights_encode_and_decode_as_forward(name: str, dtype: torch.dtype):
    """Weights cast to bf16 / fp16, no autocast: encode gives forward's codes, decode its latent."""
    dim, q = make(name)
    q = q.to(dtype).eval()
    z = latent(dim, SHAPES["2d"]).to(dtype)
    with torch.no_grad():
        out, codes = q(z), q.encode(z)
        rec = q.decode(codes)
    assert torch.equal(codes, out.codes)
    assert torch.equal(rec.to(dtype), out.quantized)
    z32 = z.float()  # a float32 latent: quantized in the weights' dtype, as decode gives it
    with torch.no_grad():
        out, codes = q(z32), q.encode(z32)
        assert torch.equal(codes, out.codes)
        torch.testing.assert_close(q.decode(codes).float(), out.quantized.float(), rtol=0, atol=0)


def _grouped():
    q = GroupedQuantizer([VectorQuantizer(D // 2, 16) for _ in range(2)])
    return q, q.groups[0], (3, 7, D)


def _dynamic():
    from tokenizers_vq.quantizers import DynamicQuantizer  # noqa: PLC0415

    q = DynamicQuantizer(VectorQuantizer(D, 16))
    return q, q.inner, (2, 4, 4, D)


@pytest.mark.parametrize("make", [_grouped, _dynamic], ids=["grouped", "dynamic"])
def test_encode_runs_every_module_in_eval_and_gives_each_its_mode_back(make):
    q, child, shape = make()
    q.eval()
    child.train()  # left training inside an eval quantizer: encode must not train it
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.encode(torch.randn(shape))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert child.training and not q.training
    q.train()
    child.eval()  # frozen child of a training quantizer: stays in eval after encode
    q.encode(torch.randn(shape))
    assert q.training and not child.training


@pytest.mark.parametrize(("make", "named"), [
    (lambda: LFQ(D, 8, temperature=0), "temperature"),
    (lambda: LFQ(D, 8, group_bits=0), "group_bits"),
    (lambda: IBQ(D, 16, temperature=-1.0), "temperature"),
    (lambda: VectorQuantizer(D, 16, eps=-1e-5), "eps"),
    (lambda: VectorQuantizer(D, 16.0), "codebook_size"),
    (lambda: VectorQuantizer(D, 16, codebook_dim=0), "codebook_dim"),
    (lambda: VectorQuantizer(D, 16, kmeans_max_samples=0), "kmeans_max_samples"),
    (lambda: FSQ(D, [2.5, 5]), "levels"),
])
def test_arguments_out_of_range_are_refused_by_name_at_construction(make, named):
    """Not a NaN loss, a rounded-down level or a raw error at the first forward."""
    with pytest.raises(ValueError, match=named):
        make()


def test_decoding_a_masks_padding_code_says_what_it_is():
    q = VectorQuantizer(D, 16).eval()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    codes = q.encode(torch.randn(2, 5, D), mask=mask)
    assert int(codes.min()) == -1
    with pytest.raises(ValueError, match=r"-1 is the code forward and encode give positions a mask left out"):
        q.decode(codes)
    assert q.decode(codes.clamp(min=0))[mask].shape == (8, D)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_quantizer_cast_to_half_precision_codes_in_eval_and_names_the_fix_in_training(dtype):
    from tokenizers_vq.quantizers import DynamicQuantizer  # noqa: PLC0415

    z = torch.randn(2, 8, 8, D)
    for make in (lambda: VectorQuantizer(D, 16), lambda: VectorQuantizer(D, 16, learning="loss"),
                 lambda: ShardedVectorQuantizer(D, 16), lambda: LFQ(D, 8), lambda: DynamicQuantizer(FSQ(D, [8, 5, 5, 5]), target_fine_ratio=0.4)):
        q = make().to(dtype).eval()
        codes = q.encode(z.to(dtype))  # a dynamic quantizer's are packed
        assert isinstance(q, DynamicQuantizer) or codes.shape[:3] == (2, 8, 8)
        q.train()
        if isinstance(q, (VectorQuantizer, ShardedVectorQuantizer)):
            with pytest.raises(ValueError, match=r"keeps its codebook statistics in float32.*quantizer.float\(\)"):
                q(z.to(dtype))
        else:
            q(z.to(dtype))


def test_a_rank_whose_mask_leaves_nothing_is_refused_in_training_under_a_process_group(monkeypatch):
    """Its peers exchange codebook statistics in the step: skipping the exchange on one rank
    would leave them waiting (or pair their exchange with another collective)."""
    from tokenizers_vq.quantizers import base  # noqa: PLC0415

    q, z = VectorQuantizer(D, 16), torch.randn(2, 5, D)
    nothing = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.equal(q(z, mask=nothing).codes, torch.full((2, 5), -1))  # alone: nothing to exchange
    monkeypatch.setattr(base, "is_distributed", lambda: True)
    with pytest.raises(ValueError, match="this rank's mask has no real position.*leave batches that are all padding out"):
        q(z, mask=nothing)
    q.eval()  # encoding exchanges nothing
    assert torch.equal(q.encode(z, mask=nothing), torch.full((2, 5), -1))
    fsq = FSQ(D, [5, 5, 5, 5]).train()  # nor does a quantizer without statistics
    assert torch.equal(fsq(z, mask=nothing).codes, torch.full((2, 5), -1))
