"""Dynamic-length coding: its own contract-like tests (its codes are variable-length
:class:`PackedCodes`, not a fixed-shape tensor, so it cannot join the ``QUANTIZERS``
contract suite), plus the router acceptance on real photos."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from testdata import shared_path
from tokenizers_vq import FSQ, LFQ, ResidualQuantizer, VectorQuantizer
from tokenizers_vq.media import load_image
from tokenizers_vq.quantizers import DynamicQuantizer, PackedCodes

D = 16
INNERS = {
    "vq": lambda: VectorQuantizer(D, 64),
    "fsq": lambda: FSQ(D, [5, 5, 5]),
    "lfq": lambda: LFQ(D, 8),
    "residual-vq": lambda: ResidualQuantizer([VectorQuantizer(D, 32) for _ in range(2)]),
}
SHAPES = {"1d": (2, 8), "2d": (2, 4, 6), "3d": (2, 2, 4, 4)}


def make(inner: str, **kw) -> DynamicQuantizer:
    torch.manual_seed(0)
    return DynamicQuantizer(INNERS[inner](), target_fine_ratio=0.4, **kw)


@pytest.mark.parametrize("rank", SHAPES)
@pytest.mark.parametrize("inner", INNERS)
def test_contract_like(inner: str, rank: str):
    dq, lead = make(inner), SHAPES[rank]
    n = len(lead) - 1
    z = torch.randn(*lead, D, requires_grad=True)
    dq.train()
    out = dq(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.codes.shape == (*lead, *dq.code_shape) and out.codes.dtype == torch.int64
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < dq.codebook_size
    assert out.fine_map.shape == (lead[0], *(s // 2 for s in lead[1:]))
    assert "budget" in out.losses
    assert all(torch.isfinite(v) and v.ndim == 0 for v in [*out.losses.values(), *out.metrics.values()])
    (out.quantized * torch.randn_like(z)).sum().add(out.total_loss()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert dq.router[0].weight.grad.abs().sum() > 0  # the router learns through the Gumbel gate

    dq.eval()
    zz = z.detach()
    with torch.no_grad():
        for budget in (None, 0, 1, 3):
            packed = dq.encode(zz, fine_regions=budget)
            ref = dq(zz, fine_regions=budget)
            assert torch.equal(dq.decode(packed), ref.quantized)  # exact, bit for bit
            n_regions = ref.fine_map[0].numel()
            if budget is not None:
                assert packed.lengths.tolist() == [dq.num_tokens(lead[1:], budget)] * lead[0]
            # every token's position and granularity agree with the routing
            for b in range(lead[0]):
                codes, pos, fine = packed.sample(b)
                assert int((~fine).sum()) + int(fine.sum()) // 2**n == n_regions
                assert (pos[~fine] % 2 == 0).all()


def test_coarse_to_fine_and_raster_orders():
    torch.manual_seed(0)
    z = torch.randn(3, 8, 8, D)
    packed = make("vq").eval().encode(z, fine_regions=5)
    for b in range(3):
        _, _, fine = packed.sample(b)
        assert fine.tolist() == [False] * 11 + [True] * 20  # all coarse first, then fine
    raster = make("vq", order="raster").eval()
    p2 = raster.encode(z, fine_regions=5)
    codes, pos, fine = p2.sample(0)
    region = (pos // 2) @ torch.tensor([4, 1])
    assert (region.diff() >= 0).all()  # region raster order
    assert torch.equal(raster.decode(p2), make("vq").eval().decode(packed))


def test_num_tokens_budget_is_exact_or_refused():
    dq = make("fsq").eval()
    z = torch.randn(2, 4, 4, 4, D)  # 8 regions of 2x2x2
    packed = dq.encode(z, num_tokens=8 + 3 * 7)
    assert packed.lengths.tolist() == [29, 29]
    with pytest.raises(ValueError, match="not reachable"):
        dq.encode(z, num_tokens=30)
    with pytest.raises(ValueError, match="larger than the number of regions"):
        dq.encode(z, fine_regions=9)


def test_bad_inputs_raise_named_value_errors():
    dq = make("vq")
    with pytest.raises(ValueError, match="not divisible by the coarse block"):
        dq(torch.randn(2, 5, 6, D))
    with pytest.raises(ValueError, match="last dimension"):
        dq(torch.randn(2, 4, 4, D + 1))
    with pytest.raises(ValueError, match="1D, 2D or 3D"):
        dq(torch.randn(2, 2, 2, 2, 2, D))
    with pytest.raises(ValueError, match="NaN or Inf"):
        dq(torch.full((2, 4, D), float("nan")))
    packed = dq.eval().encode(torch.randn(2, 4, 4, D), fine_regions=2)
    with pytest.raises(ValueError, match="out of range"):
        dq.decode(PackedCodes(packed.codes + 64, packed.positions, packed.fine, packed.offsets, packed.shape))
    dup = packed.positions.clone()
    dup[-1] = dup[-2]
    with pytest.raises(ValueError, match="exactly once"):
        dq.decode(PackedCodes(packed.codes, dup, packed.fine, packed.offsets, packed.shape))
    with pytest.raises(ValueError, match="PackedCodes"):
        dq.decode(packed.codes)


def test_state_dict_roundtrip():
    dq = make("vq")
    for _ in range(3):
        dq(torch.randn(4, 8, 8, D))
    twin = DynamicQuantizer(VectorQuantizer(D, 64), target_fine_ratio=0.4)
    twin.load_state_dict(dq.state_dict())
    z = torch.randn(2, 8, 8, D)
    a, b = dq.eval().encode(z), twin.eval().encode(z)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.positions, b.positions)


def photo_latents(split: str, n_images: int) -> torch.Tensor:
    """16x16 grids of fixed random projections (48 -> 16) of 4x4 RGB patches: 25 crops
    of 64x64 pixels from each of the first BSDS500 photos of a split."""
    folder = shared_path("images", "bsds500", split)
    proj = torch.randn(48, D, generator=torch.Generator().manual_seed(0)) / 48**0.5
    out = []
    for f in sorted(folder.glob("*.jpg"))[:n_images]:
        img = load_image(f)[:, :320, :320] * 2 - 1
        p = img.unfold(1, 4, 4).unfold(2, 4, 4).permute(1, 2, 0, 3, 4).reshape(80, 80, 48) @ proj
        out.append(p.reshape(5, 16, 5, 16, D).permute(0, 2, 1, 3, 4).reshape(25, 16, 16, D))
    return torch.cat(out)


def test_router_hits_target_fine_ratio_on_real_photos():
    train, val = photo_latents("train", 40), photo_latents("val", 40)
    torch.manual_seed(0)
    target = 0.3
    dq = DynamicQuantizer(VectorQuantizer(D, 256, kmeans_init=True), target_fine_ratio=target, budget_weight=300.0)
    opt = torch.optim.Adam(dq.parameters(), lr=3e-3)
    sampled = []
    for step in range(150):
        z = train[torch.randint(0, len(train), (16,))]
        out = dq(z)
        # a sum-scale reconstruction term makes the router decisive (see DynamicQuantizer's docstring)
        loss = 100 * F.mse_loss(out.quantized, z) + out.total_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 100:
            sampled.append(float(out.metrics["fine_ratio"]))
    dq.eval()
    with torch.no_grad():
        ema_calibrated = float(dq(val).metrics["fine_ratio"])
        dq.calibrate_threshold(train)
        calibrated = float(dq(val).metrics["fine_ratio"])
        dq.calibrate = False
        by_sign = float(dq(val).metrics["fine_ratio"])
        dq.calibrate = True
        packed = dq.encode(val[:50], num_tokens=dq.num_tokens((16, 16), 20))
        exact = torch.equal(dq.decode(packed), dq(val[:50], fine_regions=20).quantized)
    print(
        f"fine ratio (target {target}): training samples {sum(sampled) / len(sampled):.3f}; held-out eval with "
        f"threshold calibrated on train {calibrated:.3f} (running EMA threshold {ema_calibrated:.3f}, score sign "
        f"{by_sign:.3f}); tokens/sample at 20 fine regions {packed.lengths.unique().tolist()}"
    )
    assert abs(sum(sampled) / len(sampled) - target) <= 0.02  # the budget loss holds training on target
    # and the eval routing on unseen photos (over seeds 0-4 and two codebook samplings: 0.288 to 0.323)
    assert abs(calibrated - target) <= 0.03
    assert packed.lengths.unique().tolist() == [64 + 20 * 3]
    assert exact


def test_budgets_batch_sizes_and_offsets_of_the_wrong_kind_are_refused_by_name():
    """Not topk's or range()'s TypeError, nor an IndexError on empty offsets."""
    dq = make("vq").eval()
    z = torch.randn(2, 4, 4, D)
    for kwargs, said in (({"fine_regions": 2.0}, "fine_regions must be a whole number"),
                         ({"fine_regions": -1}, "fine_regions must be a whole number"),
                         ({"num_tokens": 10.0}, "num_tokens must be a whole number")):
        with pytest.raises(ValueError, match=said):
            dq.encode(z, **kwargs)
    for size in (0, 2.5):
        with pytest.raises(ValueError, match=r"batch_size must be a whole number in \[1, inf\)"):
            dq.calibrate_threshold(z, batch_size=size)
    packed = dq.encode(z, fine_regions=2)
    for offsets in (torch.tensor([], dtype=torch.long), torch.tensor([0])):
        with pytest.raises(ValueError, match=r"offsets must be \(B \+ 1,\) for B >= 1 samples"):
            dq.decode(PackedCodes(packed.codes, packed.positions, packed.fine, offsets, packed.shape))
    assert torch.equal(dq.decode(packed), dq(z, fine_regions=2).quantized)
