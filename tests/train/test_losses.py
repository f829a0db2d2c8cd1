"""Loss terms and discriminators."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from tokenizers_vq.train.discriminators import build_discriminator
from tokenizers_vq.train.losses import (
    LPIPS,
    LeCam,
    adaptive_weight,
    feature_matching,
    hinge_d_loss,
    hinge_g_loss,
    load_backbone,
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


def test_lpips_without_the_vision_extra_or_weights_says_what_is_missing(tmp_path, monkeypatch):
    if importlib.util.find_spec("lpips") is None:
        with pytest.raises(RuntimeError, match="vision extra"):
            LPIPS()
        monkeypatch.setitem(sys.modules, "lpips", None)
    else:
        with pytest.raises(RuntimeError, match="weights not found"):
            LPIPS(weights=tmp_path / "absent.pth")


def test_lpips_random_backbone_plumbing():
    pytest.importorskip("torchvision", reason="torchvision (vision extra) does not import with this torch build")
    pytest.importorskip("lpips", reason="the lpips package (vision extra) is not installed")
    m = LPIPS("alex", random_backbone=True)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert float(m(x, x)) == pytest.approx(0.0, abs=1e-6) and float(m(x, -x)) > 0


def test_torchvision_weights_map_onto_lpips_slices():
    """lpips keeps torchvision's layer index inside each slice: features.{i} -> slice{k}.{i}."""
    net = nn.Module()
    net.slice1 = nn.Sequential()
    net.slice1.add_module("0", nn.Conv2d(3, 4, 3))
    net.slice2 = nn.Sequential()
    net.slice2.add_module("2", nn.Conv2d(4, 4, 3))
    state = {"features.0.weight": torch.randn(4, 3, 3, 3), "features.0.bias": torch.randn(4),
             "features.2.weight": torch.randn(4, 4, 3, 3), "features.2.bias": torch.randn(4),
             "classifier.1.weight": torch.randn(2, 2)}
    load_backbone(net, state)
    assert torch.equal(net.slice2[0].weight, state["features.2.weight"])
    with pytest.raises(RuntimeError, match="wrong file"):
        load_backbone(net, {"features.0.weight": torch.randn(4, 3, 3, 3)})
