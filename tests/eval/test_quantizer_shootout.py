"""The quantizer shootout on CPU, a few steps on real photos: one row per bottleneck with
held-apart metrics, a table and a picture; the peer adapter keeps our contract."""

from __future__ import annotations

import importlib.util
import json
import types

import pytest
import torch
from testdata import shared_path

from tokenizers_vq.eval import quantizer_shootout as shootout


def test_each_bottleneck_trains_and_is_measured(tmp_path):
    """Two trainings at a time; the rows keep the order of ``--methods``."""
    photos = shared_path("images", "bsds500")
    shootout.main(["--data", str(photos / "train"), "--val", str(photos / "val"), "--steps", "2", "--batch-size", "2",
                   "--crop", "32", "--max-items", "2", "--val-items", "2",
                   "--methods", "ours-vq-ema,ours-bsq,vqp-fsq,vq-fast-ema", "--variant", 'vq-fast-ema=ours-vq-ema:{"decay": 0.8}',
                   "--parallel", "2", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "shootout.json").read_text())["rows"]}
    assert list(rows) == ["ours-vq-ema", "ours-bsq", "vqp-fsq", "vq-fast-ema"]
    assert rows["vq-fast-ema"]["options"] == {**shootout.METHODS["ours-vq-ema"][1], "decay": 0.8}
    for name in ("ours-vq-ema", "ours-bsq", "vq-fast-ema"):
        r = rows[name]
        assert r["steps"] == 2 and r["codebook_size"] == 1024 and 0 < r["usage"] <= 1 and r["psnr_db"] > 0
    peer = rows["vqp-fsq"]
    if importlib.util.find_spec("vector_quantize_pytorch") is None:
        assert peer["error"] == "skipped: vector-quantize-pytorch is not installed"
    else:
        assert peer["codebook_size"] == 1000 and peer["steps"] == 2
    table = (tmp_path / "shootout.md").read_text()
    assert "| ours-vq-ema | 1024 |" in table and "--steps 2" in table and "2 training(s) at a time" in table
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


def test_a_variant_changes_the_options_of_an_existing_row_and_bad_ones_are_named():
    table = shootout.with_variants(shootout.METHODS, ['small-dim=ours-vq-ema:{"codebook_dim": 8}'])
    assert table["small-dim"] == ("vq", {**shootout.METHODS["ours-vq-ema"][1], "codebook_dim": 8})
    assert "small-dim" not in shootout.METHODS  # the shipped table is left as it is
    for bad in ("no-equals", "x=no-such-method:{}", "x=ours-vq-ema:[1]", "x=ours-vq-ema:{decay: 1}", "ours-fsq=ours-vq-ema:{}"):
        with pytest.raises(ValueError, match="--variant"):
            shootout.with_variants(shootout.METHODS, [bad])
