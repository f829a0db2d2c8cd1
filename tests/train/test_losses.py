"""Loss terms and discriminators."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from testdata import lpips_files
from torch import nn

from tokenizers_vq.lpips import load_lpips, lpips_distance

from tokenizers_vq.train.discriminators import build_discriminator
from tokenizers_vq.train.losses import (
    LPIPS,
    LeCam,
    adaptive_weight,
    feature_matching,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_terms,
)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    x = torch.randn(8, 4)
    y = layer(x)
    rec, gan = (y - 1).pow(2).mean(), -3 * y.mean()
    w = adaptive_weight(rec, gan, layer.weight)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight)[0]
    assert torch.allclose(w, g_rec.norm() / (g_gan.norm() + 1e-4))
    assert not w.requires_grad


def test_hinge_losses_and_lecam():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.0])]
    assert float(hinge_d_loss(real, fake)) == pytest.approx((0 + 0.5) / 2 + (0 + 1.0) / 2)
    assert float(hinge_g_loss(fake)) == pytest.approx(1.0)
    lecam = LeCam(decay=0.0)  # EMAs jump to the batch means
    reg = lecam(real, fake)
    assert float(lecam.real_ema) == pytest.approx(1.25) and float(lecam.fake_ema) == pytest.approx(-1.0)
    manual = torch.relu(real[0] + 1.0).pow(2).mean() + torch.relu(1.25 - fake[0]).pow(2).mean()
    assert float(reg) == pytest.approx(float(manual))
    feats = [torch.ones(3), torch.zeros(2)]
    assert float(feature_matching(feats, [f + 0.5 for f in feats])) == pytest.approx(0.5)


def test_audio_reconstruction_terms_include_spectral_losses():
    x = torch.randn(2, 1, 8000) * 0.1
    terms = reconstruction_terms(x + 0.01 * torch.randn_like(x), x, "audio", 16000)
    assert set(terms) == {"l1", "l2", "mel", "stft"} and all(v > 0 for v in terms.values())
    assert float(reconstruction_terms(x, x, "audio", 16000)["mel"]) == 0.0
    skipped = reconstruction_terms(x + 0.01, x, "audio", 16000, skip=frozenset({"stft"}))
    assert set(skipped) == {"l1", "l2", "mel"}  # a term weighted 0 is not computed


def test_the_stft_loss_of_a_silent_target_stays_in_scale_and_speech_keeps_its_value():
    from tokenizers_vq.spectral import STFT_RESOLUTIONS, stft_magnitude  # noqa: PLC0415

    torch.manual_seed(0)
    noise = (torch.randn(2, 1, 16000) * 1e-3).requires_grad_()
    silent = reconstruction_terms(noise, torch.zeros(2, 1, 16000), "audio", 16000)["stft"]
    assert 0 < float(silent) < 20  # 5e5 if the spectral convergence divided by a silent target's norm
    silent.backward()
    assert torch.isfinite(noise.grad).all() and noise.grad.abs().sum() > 0  # no 0 * inf from a norm of zero
    x = torch.randn(2, 1, 16000) * 0.1
    y = x + 0.01 * torch.randn_like(x)
    whole = 0.0  # the batch-wide spectral convergence of targets that are heard
    for n in STFT_RESOLUTIONS:
        mx, my = stft_magnitude(x, n, n // 4), stft_magnitude(y, n, n // 4)
        whole += float((my - mx).norm() / my.norm() + (torch.log(my + 1e-5) - torch.log(mx + 1e-5)).abs().mean())
    assert float(reconstruction_terms(x, y, "audio", 16000)["stft"]) == pytest.approx(whole / 3, rel=1e-5)


@pytest.mark.parametrize("modality,shape", [("image", (2, 3, 64, 64)), ("video", (1, 3, 5, 32, 32)), ("audio", (2, 1, 8000))])
def test_discriminators_give_logits_and_features_with_gradients(modality, shape):
    d = build_discriminator(modality)
    x = torch.randn(*shape, requires_grad=True)
    logits, feats = d(x)
    assert logits and feats and all(t.shape[0] == shape[0] for t in logits)
    hinge_g_loss(logits).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no discriminator"):
        build_discriminator("text")


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_random_backbone_plumbing(net, tmp_path, monkeypatch):
    """Random trunk and heads: no weight file (an empty hub cache) and no lpips package."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setitem(sys.modules, "lpips", None)
    torch.manual_seed(0)
    m = LPIPS(net, random_backbone=True)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    x = (torch.rand(2, 3, 48, 48) * 2 - 1).requires_grad_()
    assert m(x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = m(x, -x)
    assert d.shape == () and d.item() > 0
    d.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loss_from_weight_files_is_the_eval_lpips(net, tmp_path):
    torch.manual_seed(0)
    backbone, heads = lpips_files(tmp_path, net)
    m = LPIPS(net, backbone, heads)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    x, y = torch.rand(3, 3, 40, 48), torch.rand(3, 3, 40, 48)  # images in [0, 1], as eval takes them
    d = float(m(x * 2 - 1, y * 2 - 1))
    assert d > 0 and d == pytest.approx(lpips_distance(load_lpips(backbone, heads), x, y), rel=1e-5)
    with pytest.raises(ValueError, match="not the .* asked for"):
        LPIPS("vgg" if net == "alex" else "alex", backbone, heads)


def lpips_alex_by_hand(backbone: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 over AlexNet written out from the paper's definition and the lpips package's
    constants, in plain torch ops: the inputs shifted and scaled per channel, the ReLU outputs
    of the five convolutions, each unit-normalised over its channels, squared differences
    weighted by the layer's head, averaged over space and summed over layers."""
    import torch.nn.functional as F  # noqa: PLC0415

    shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])

    def taps(v):
        v = (v - shift.view(1, 3, 1, 1)) / scale.view(1, 3, 1, 1)
        out = []
        for i, (stride, pad, pool) in zip((0, 3, 6, 8, 10), ((4, 2, False), (1, 2, True), (1, 1, True), (1, 1, False),
                                                             (1, 1, False))):
            v = F.max_pool2d(v, 3, 2) if pool else v
            v = F.relu(F.conv2d(v, backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"], stride, pad))
            out.append(v)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a, b = (t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for t in (a, b))
        total = total + F.conv2d((a - b) ** 2, heads[f"lin{k}.model.1.weight"]).mean((2, 3))
    return total.flatten()


def test_lpips_equals_its_definition_written_out(tmp_path):
    torch.manual_seed(0)
    backbone, heads = lpips_files(tmp_path, "alex")
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    ref = lpips_alex_by_hand(torch.load(backbone, weights_only=True), torch.load(heads, weights_only=True), x, y)
    assert ref.shape == (2,) and (ref > 0).all()
    with torch.no_grad():
        assert float(LPIPS("alex", backbone, heads)(x, y)) == pytest.approx(float(ref.mean()), rel=1e-5)
        per_image = lpips_distance(load_lpips(backbone, heads), (x + 1) / 2, (y + 1) / 2)
    assert per_image == pytest.approx(float(ref.mean()), rel=1e-5)


def test_lpips_loss_matches_the_lpips_package(tmp_path):
    pytest.importorskip("torchvision", reason="torchvision (the vision extra) is not installed, or does not import with this torch build")
    lpips = pytest.importorskip("lpips", reason="the lpips package (vision extra) is not installed")
    torch.manual_seed(0)
    backbone, heads = lpips_files(tmp_path, "alex")
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, model_path=str(heads), verbose=False).eval()
    state = torch.load(backbone, weights_only=True)
    # lpips keeps torchvision's layer index inside each slice: slice{k}.{i} is features.{i}
    ref.net.load_state_dict({k: state["features." + k.split(".", 1)[1]] for k in ref.net.state_dict()})
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert float(LPIPS("alex", backbone, heads)(x, y)) == pytest.approx(float(ref(x, y).mean()), rel=1e-5)


def test_lpips_without_its_files_names_the_path_and_the_config_fields(tmp_path, monkeypatch):
    torch.manual_seed(0)
    backbone, heads = lpips_files(tmp_path / "weights", "alex")
    absent = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"backbone weights not found at {absent}")) as e:
        LPIPS("alex", absent, heads)
    assert "loss.lpips_weights" in str(e.value) and "torch hub cache" in str(e.value)
    with pytest.raises(FileNotFoundError, match=re.escape(f"heads not found at {absent}")) as e:
        LPIPS("alex", backbone, absent)
    assert "loss.lpips_heads" in str(e.value)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cache = tmp_path / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError, match=re.escape(f"(vgg16-397923af.pth) not found in {cache}")):
        LPIPS("vgg")
    monkeypatch.setitem(sys.modules, "lpips", None)  # the package that ships the heads: absent
    with pytest.raises(FileNotFoundError, match="lpips package that ships them is not installed") as e:
        LPIPS("alex", backbone)
    assert "loss.lpips_heads" in str(e.value) and "pip install lpips" in str(e.value)
    with pytest.raises(ValueError, match="must be one of"):
        LPIPS("resnet", random_backbone=True)


def test_mel_filterbanks_cached_under_inference_mode_still_train():
    """The filterbank caches outlive the call that fills them: one first built under
    torch.inference_mode (evaluation) must still work in a training loss afterwards."""
    from tokenizers_vq.spectral import multiscale_mel_distance

    x, y = torch.randn(1, 1, 4000), torch.randn(1, 1, 4000)
    with torch.inference_mode():
        multiscale_mel_distance(x, y, 12345)  # a rate no other test uses: the caches fill here
    rec = torch.randn(1, 1, 4000, requires_grad=True)
    multiscale_mel_distance(rec, y, 12345).backward()
    assert rec.grad is not None and torch.isfinite(rec.grad).all()
