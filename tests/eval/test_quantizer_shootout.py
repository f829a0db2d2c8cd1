"""The quantizer shootout on CPU, a few steps on real photos: one row per bottleneck with
held-apart metrics, a table and a picture; the peer adapter keeps our contract."""

from __future__ import annotations

import importlib.util
import json
import math
import types

import pytest
import torch
from testdata import shared_path

from tokenizers_vq.eval import quantizer_shootout as shootout


def test_each_bottleneck_trains_and_is_measured(tmp_path):
    """Two trainings at a time, 256 codes each; the rows keep the order of ``--methods``."""
    photos = shared_path("images", "bsds500")
    shootout.main(["--data", str(photos / "train"), "--val", str(photos / "val"), "--steps", "2", "--batch-size", "2",
                   "--crop", "32", "--max-items", "2", "--val-items", "2",
                   "--methods", "ours-vq-ema,ours-bsq,vqp-fsq,vq-fast-ema", "--variant", 'vq-fast-ema=ours-vq-ema:{"decay": 0.8}',
                   "--parallel", "2", "--codebook-size", "256", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "shootout.json").read_text())["rows"]}
    assert list(rows) == ["ours-vq-ema", "ours-bsq", "vqp-fsq", "vq-fast-ema"]
    assert rows["vq-fast-ema"]["options"] == {**shootout.methods(256)["ours-vq-ema"][1], "decay": 0.8}
    for name in ("ours-vq-ema", "ours-bsq", "vq-fast-ema"):
        r = rows[name]
        assert r["steps"] == 2 and r["codebook_size"] == 256 and 0 < r["usage"] <= 1 and r["psnr_db"] > 0
    peer = rows["vqp-fsq"]
    if importlib.util.find_spec("vector_quantize_pytorch") is None:
        assert peer["error"] == "skipped: vector-quantize-pytorch is not installed"
    else:
        assert peer["codebook_size"] == 240 and peer["steps"] == 2
    table = (tmp_path / "shootout.md").read_text()
    assert "| ours-vq-ema | 256 |" in table and "256 codes" in table and "--steps 2" in table and "2 training(s) at a time" in table
    assert (tmp_path / "shootout.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["vq", "fsq", "fsp", "binary", "lfq", "simvq"])
def test_peer_adapter_keeps_the_contract(method):
    vqp = pytest.importorskip("vector_quantize_pytorch", reason="the peer is not installed")
    if not hasattr(vqp, {"fsp": "FSP", "binary": "BinaryMapper"}.get(method, "FSQ")):
        pytest.skip(f"the installed vector-quantize-pytorch predates its {method} layer (1.34)")
    torch.manual_seed(0)
    q = shootout.PeerQuantizer(32, method, 1000 if method in ("fsq", "fsp") else 1024)
    z = torch.randn(2, 4, 5, 32)
    out = q.train()(z)
    assert out.quantized.shape == z.shape and out.codes.shape == (2, 4, 5)
    q.eval()
    codes = q.encode(z)
    assert int(codes.max()) < q.codebook_size
    torch.testing.assert_close(q.decode(codes), q(z).quantized, atol=1e-5, rtol=1e-5)


def test_the_peer_dead_code_setting_follows_its_signature():
    class Absolute:  # up to 1.32: an EMA count
        def __init__(self, dim, threshold_ema_dead_code=0): ...

    class Ratio:  # from 1.34: a ratio of the mean count (an absolute 2 read as 2 / codebook_size)
        def __init__(self, dim, dead_code_threshold_ratio=0.0, threshold_ema_dead_code=None): ...

    assert shootout.peer_dead_codes(types.SimpleNamespace(VectorQuantize=Absolute)) == {"threshold_ema_dead_code": 2}
    assert shootout.peer_dead_codes(types.SimpleNamespace(VectorQuantize=Absolute), 256) == {"threshold_ema_dead_code": 8}
    assert shootout.peer_dead_codes(types.SimpleNamespace(VectorQuantize=Ratio), 256) == {"dead_code_threshold_ratio": 0.1}
    assert shootout.peer_dead_codes(types.SimpleNamespace(VectorQuantize=Ratio)) == {"dead_code_threshold_ratio": 0.1}


@pytest.mark.parametrize("method", [m for m in shootout.METHODS if m.startswith("ours-")])
def test_each_of_our_bottlenecks_builds_from_its_row(method):
    """Every row of ours is a valid quantizer config (a typo in an option would only show on
    the device), and the rotation-trick rows really switch the estimator."""
    from tokenizers_vq.tokenizer_config import QuantizerConfig  # noqa: PLC0415

    kind, options = shootout.METHODS[method]
    q = QuantizerConfig(kind=kind, options=options).build(8)
    out = q(torch.randn(2, 4, 4, 8))
    assert out.codes.shape == (2, 4, 4) and q.codebook_size in (1000, 1024)
    assert getattr(q, "estimator", "ste") == ("rotation" if method.endswith("-rot") else "ste")


@pytest.mark.parametrize("size", sorted(shootout.FSQ_LEVELS_BY_SIZE))
def test_every_row_has_the_codebook_size_asked_for(size):
    """At every size each row of ours builds with that many codes (FSQ and FSP: the paper's
    levels, within 7% as many), and a size without recommended levels is refused by name."""
    from tokenizers_vq.tokenizer_config import QuantizerConfig  # noqa: PLC0415

    table = shootout.methods(size)
    assert set(table) == set(shootout.METHODS)
    fsq = math.prod(shootout.FSQ_LEVELS_BY_SIZE[size])
    assert abs(fsq / size - 1) < 0.07
    for name, (kind, options) in table.items():
        if name.startswith("vqp-"):
            assert options["codebook_size"] == (fsq if name in ("vqp-fsq", "vqp-fsp") else size)
            continue
        q = QuantizerConfig(kind=kind, options=options).build(8)
        assert q.codebook_size == (fsq if kind in ("fsq", "fsp") else size), name
    assert table["ours-vq-ema"][1]["dead_code_threshold"] * size == 2.0 * 1024  # the same fraction of the mean count
    with pytest.raises(ValueError, match="codebook size 1000"):
        shootout.methods(1000)


def test_the_peer_fsq_takes_the_levels_of_its_size():
    pytest.importorskip("vector_quantize_pytorch", reason="the peer is not installed")
    q = shootout.PeerQuantizer(16, "fsq", math.prod(shootout.FSQ_LEVELS_BY_SIZE[16384]))
    assert list(q.layer._levels.tolist()) == shootout.FSQ_LEVELS_BY_SIZE[16384]
    with pytest.raises(ValueError, match="no FSQ levels give 1024 codes"):
        shootout.PeerQuantizer(16, "fsq", 1024)


def test_a_variant_changes_the_options_of_an_existing_row_and_bad_ones_are_named():
    table = shootout.with_variants(shootout.METHODS, ['small-dim=ours-vq-ema:{"codebook_dim": 8}'])
    assert table["small-dim"] == ("vq", {**shootout.METHODS["ours-vq-ema"][1], "codebook_dim": 8})
    assert "small-dim" not in shootout.METHODS  # the shipped table is left as it is
    for bad in ("no-equals", "x=no-such-method:{}", "x=ours-vq-ema:[1]", "x=ours-vq-ema:{decay: 1}", "ours-fsq=ours-vq-ema:{}"):
        with pytest.raises(ValueError, match="--variant"):
            shootout.with_variants(shootout.METHODS, [bad])
