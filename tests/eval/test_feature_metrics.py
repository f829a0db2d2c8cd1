"""LPIPS and rFID: the Fréchet distance against closed forms, the networks against the
published weight files' layouts, and `tvq eval` computing both from weight files.

No pretrained file can be downloaded on these machines, so the files here hold random
weights in the published layouts: they test the plumbing, not the numbers' meaning.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from test_tokenizer import tiny
from testdata import LPIPS_CONVS, lpips_files, lpips_heads, shared_path

from tokenizers_vq.cli import main
from tokenizers_vq.eval.inception import FIDInception, inception_features, load_inception
from tokenizers_vq.lpips import LPIPSNet, load_lpips, lpips_distance
from tokenizers_vq.eval.metrics import feature_frechet_distance, frechet_distance

# pytorch-fid's FID Inception (torchvision's Inception3 layout, aux_logits=False,
# num_classes=1008): every conv is ``{name}.conv.weight`` + ``{name}.bn.*`` (eps 1e-3)
STEM = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
        "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3)}
BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
MIXED = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C", "Mixed_6c": "C",
         "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
INCEPTION_SHAPES = {
    **{f"{k}.conv.weight": v for k, v in STEM.items()},
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.running_var": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and
# with 1008 classes instead of 1000 (+8 * 2049): 23,850,960
INCEPTION_PARAMETERS = 27_161_264 - 3_326_696 + 8 * 2049


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weight files in the published layouts: torchvision AlexNet, lpips v0.1 alex
    heads, pytorch-fid Inception (He-initialised so activations keep their scale)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("weights")
    backbone, heads = lpips_files(d, "alex")
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    torch.save(net.state_dict(), d / "pt_inception-2015-12-05-6726825d.pth")
    return {"lpips": backbone, "heads": heads, "fid": d / "pt_inception-2015-12-05-6726825d.pth"}


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    torch.manual_seed(0)
    d = 16
    mu1, mu2 = torch.randn(d), torch.randn(d)
    s1, s2 = torch.rand(d) + 0.1, torch.rand(d) * 3
    q = torch.linalg.qr(torch.randn(d, d))[0]  # a shared rotation leaves the distance unchanged
    sigma1, sigma2 = (q * s1) @ q.T, (q * s2) @ q.T  # q diag(s) q^T
    expected = (mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    assert frechet_distance(q @ mu1, sigma1, q @ mu2, sigma2) == pytest.approx(expected.item(), rel=1e-5)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("n", [5, 300])  # fewer samples than dimensions (sample form) and more (covariances)
def test_fid_of_features_is_zero_for_one_set_and_matches_the_covariance_form(n):
    torch.manual_seed(0)
    d = 64
    a = torch.randn(n, d, dtype=torch.float64)
    b = torch.randn(n + 3, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64) * 0.3 + 0.5
    assert feature_frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    by_cov = frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert feature_frechet_distance(a, b) == pytest.approx(by_cov, rel=1e-6)
    if n > d:  # full-rank covariances: an independent matrix square root
        linalg = pytest.importorskip("scipy.linalg")
        s1, s2 = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
        ref = (a.mean(0) - b.mean(0)).square().sum().item() + s1.trace() + s2.trace() - 2 * linalg.sqrtm(s1 @ s2).real.trace()
        assert feature_frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    with pytest.raises(ValueError, match="at least 2"):
        feature_frechet_distance(a[:1], b)


def test_fid_inception_has_pytorch_fids_layout_and_gives_2048_features(weights, tmp_path):
    net = FIDInception()
    state = net.state_dict()
    convs = list(STEM) + [f"{block}.{branch}" for block, kind in MIXED.items() for branch in BRANCHES[kind]]
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {f"{c}.conv.weight" for c in convs} | {f"{c}.bn.{k}" for c in convs for k in bn} | {"fc.weight", "fc.bias"}
    assert len(convs) == 94 and set(state) == expected
    assert {k: tuple(state[k].shape) for k in INCEPTION_SHAPES} == INCEPTION_SHAPES
    assert all(state[f"{c}.bn.{k}"].shape == (state[f"{c}.conv.weight"].shape[0],) for c in convs for k in bn[:4])
    assert sum(p.numel() for p in net.parameters()) == INCEPTION_PARAMETERS
    feats = net(torch.rand(2, 3, 64, 80))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()

    loaded = load_inception(weights["fid"])  # strict load of a file in that layout
    saved = torch.load(weights["fid"], weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    # a file without BatchNorm's step counters loads too; one of another network does not
    torch.save({k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth")
    load_inception(tmp_path / "old.pth")
    torch.save({"fc.weight": saved["fc.weight"][:1000], "fc.bias": saved["fc.bias"][:1000]}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not the FID Inception"):
        load_inception(tmp_path / "wrong.pth")
    with pytest.raises(FileNotFoundError, match="Inception weights not found at .*nothing.pth"):
        load_inception(tmp_path / "nothing.pth")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loads_torchvision_and_lpips_files_and_is_a_distance(net, tmp_path):
    torch.manual_seed(0)
    backbone, heads = lpips_files(tmp_path, net)
    model = load_lpips(backbone, heads)
    assert model.net == net
    assert {k: tuple(v.shape) for k, v in model.features.state_dict().items() if k.endswith("weight")} == \
        {f"{i}.weight": s if len(s) == 4 else (*s, 3, 3) for i, s in LPIPS_CONVS[net].items()}
    x, y = torch.rand(2, 3, 48, 40), torch.rand(2, 3, 48, 40)
    d = model(x * 2 - 1, y * 2 - 1)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(d, model(y * 2 - 1, x * 2 - 1)) and model(x, x).abs().max() < 1e-6
    assert lpips_distance(model, y[0], x[0]) == pytest.approx(d[0].item(), rel=1e-5)

    with pytest.raises(FileNotFoundError, match=re.escape(f"heads not found at {tmp_path / 'none.pth'}")):
        load_lpips(backbone, tmp_path / "none.pth")
    with pytest.raises(FileNotFoundError, match=re.escape(f"backbone weights not found at {tmp_path / 'none.pth'}")):
        load_lpips(tmp_path / "none.pth", heads)
    other = "vgg" if net == "alex" else "alex"
    torch.save(lpips_heads(other), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="do not fit"):
        load_lpips(backbone, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=f"holds LPIPS-{net} backbone weights, not the {other} asked for"):
        load_lpips(backbone, heads, net=other)


def test_video_lpips_is_the_mean_over_frames(weights):
    from tokenizers_vq.eval.evaluate import item_metrics  # noqa: PLC0415

    model = load_lpips(weights["lpips"], weights["heads"])
    torch.manual_seed(0)
    clip = torch.rand(5, 3, 40, 48)
    rec = (clip + 0.1 * torch.randn_like(clip)).clamp(0, 1)
    per_frame = [lpips_distance(model, r, f) for r, f in zip(rec, clip)]
    assert item_metrics(tiny("video"), clip, rec, model)["lpips"] == pytest.approx(sum(per_frame) / 5, rel=1e-5)
    assert lpips_distance(model, rec, clip, chunk=2) == pytest.approx(sum(per_frame) / 5, rel=1e-5)


def _photos(tmp_path, n):
    """``n`` real BSDS photos, centre crops of 96x128 (PNG, lossless) to keep the CPU time
    of the tokenizer and LPIPS small; FID resizes to 299 whatever the input size."""
    from PIL import Image  # noqa: PLC0415

    data = tmp_path / "photos"
    data.mkdir()
    for p in sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:n]:
        with Image.open(p) as im:
            left, top = (im.width - 128) // 2, (im.height - 96) // 2
            im.convert("RGB").crop((left, top, left + 128, top + 96)).save(data / f"{p.stem}.png")
    return data


def test_tvq_eval_computes_lpips_and_rfid_from_weight_files(weights, tmp_path):
    from tokenizers_vq.media import load_image  # noqa: PLC0415
    from tokenizers_vq.tokenizer import Tokenizer  # noqa: PLC0415
    from tokenizers_vq.tokens import decode_record, encode_file  # noqa: PLC0415

    model = tiny("image").save_pretrained(tmp_path / "model")
    data, out = _photos(tmp_path, 3), tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--lpips-weights",
                 str(weights["lpips"]), "--lpips-heads", str(weights["heads"]), "--fid-weights", str(weights["fid"])]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert "lpips" not in result["skipped"] and "rfid" not in result["skipped"]

    tok = Tokenizer.from_pretrained(model)
    lp, inc = load_lpips(weights["lpips"], weights["heads"]), load_inception(weights["fid"])
    refs = [load_image(f) for f in sorted(data.iterdir())]
    recs = [decode_record(tok, encode_file(tok, f)) for f in sorted(data.iterdir())]
    direct = [lpips_distance(lp, rec, ref) for rec, ref in zip(recs, refs)]
    assert [it["lpips"] for it in result["items"]] == pytest.approx(direct, rel=1e-6)
    assert result["summary"]["lpips"] == pytest.approx(sum(direct) / 3, rel=1e-6)
    fid = feature_frechet_distance(torch.cat([inception_features(inc, r) for r in refs]),
                                   torch.cat([inception_features(inc, r) for r in recs]))
    assert result["summary"]["rfid"] == pytest.approx(fid, rel=1e-6) and fid > 0
    assert result["summary"]["rfid_images"] == 3
    report = (out / "report.md").read_text()
    assert f"| lpips | {result['summary']['lpips']:.4f} |" in report and f"| rfid | {fid:.4f} |" in report
    assert "rFID is over 3 images" in report


def test_tvq_eval_without_weights_says_what_it_skipped_and_writes_the_rest(tmp_path, capsys, monkeypatch):
    from tokenizers_vq.eval.inception import FID_WEIGHTS_FILE  # noqa: PLC0415

    model = tiny("image").save_pretrained(tmp_path / "model")
    data, out = _photos(tmp_path, 2), tmp_path / "report"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no"))  # an empty torch hub cache
    missing_fid = tmp_path / "no" / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    for flag in ("--lpips-weights", "--fid-weights"):  # a file named and absent: refused, not skipped
        assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(out), flag, str(missing_fid)]) == 1
        assert "not found at" in capsys.readouterr().err and not out.exists()
    assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["skipped"]["lpips"].startswith("LPIPS skipped: LPIPS backbone weights (")
    assert result["skipped"]["rfid"] == f"rFID skipped: Inception weights not found at {missing_fid}"
    assert "lpips" not in result["summary"] and "rfid" not in result["summary"]
    assert result["summary"]["items"] == 2 and math.isfinite(result["summary"]["psnr_db"])
    report = (out / "report.md").read_text()
    assert f"- rFID skipped: Inception weights not found at {missing_fid}" in report and "| psnr_db |" in report
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"report.md", "metrics.json", "codebook_usage.png", "metric_distributions.png", "reconstructions.png"} <= names
    assert "rFID skipped" in capsys.readouterr().out


def test_rfid_of_one_image_is_skipped_with_the_reason(weights, tmp_path):
    from tokenizers_vq.eval.report import write_report  # noqa: PLC0415

    files = sorted(_photos(tmp_path, 1).iterdir())
    result = write_report(tiny("image"), files, tmp_path / "report", "tiny", lpips_weights=weights["lpips"],
                          lpips_heads=weights["heads"], fid_weights=weights["fid"])
    assert result["skipped"] == {"rfid": "rFID skipped: needs at least 2 images, got 1"}
    assert math.isfinite(result["summary"]["lpips"])
