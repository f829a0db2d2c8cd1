"""Audio backbone: shapes, hop and rate, causality (and its absence when not
asked for), input checks, gradients, and a short autoencoding run on real speech."""

from __future__ import annotations

import pytest
import soundfile as sf
import torch

from testdata import shared_path
from tokenizers_vq.backbones import AudioBackboneConfig, AudioDecoder, AudioEncoder


def small(strides=(2, 4), **kw) -> AudioBackboneConfig:
    return AudioBackboneConfig(
        channels=4, strides=strides, latent_dim=8, decoder_dim=16, decoder_layers=2, **kw
    )


def test_default_rate():
    cfg = AudioBackboneConfig()
    assert cfg.hop == 320
    assert cfg.tokens_per_second == 50.0
    assert AudioBackboneConfig(sample_rate=24000, strides=(2, 4, 5, 8)).tokens_per_second == 75.0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("strides", "frames"), [((2, 4), 1), ((2, 4), 13), ((3, 5), 7), ((2, 4, 5), 4)])
def test_shapes(strides, frames, causal):
    cfg = small(strides, causal=causal)
    enc, dec = AudioEncoder(cfg), AudioDecoder(cfg)
    x = torch.randn(3, 1, frames * cfg.hop)
    z = enc(x)
    assert z.shape == (3, 8, frames)
    assert dec.frame_features(z).shape == (3, 4 * cfg.hop + 2, frames)
    assert dec(z).shape == (3, 1, frames * cfg.hop)


def perturb_after(x: torch.Tensor, start: int) -> torch.Tensor:
    y = x.clone()
    y[..., start:] = torch.randn_like(y[..., start:])
    return y


@pytest.mark.parametrize("causal", [True, False])
def test_encoder_causality(causal):
    """Frame t of a causal encoder sees samples < (t + 1) * hop only; a non-causal
    one looks ahead, so the same check must fail for it."""
    torch.manual_seed(0)
    cfg = small(causal=causal)
    enc, hop, frames = AudioEncoder(cfg).eval(), cfg.hop, 12
    x = torch.randn(1, 1, frames * hop)
    z = enc(x)
    leaked = False
    for cut in range(1, frames):
        z2 = enc(perturb_after(x, cut * hop))  # changes samples >= cut * hop
        past_same = torch.allclose(z2[..., :cut], z[..., :cut], atol=1e-6, rtol=0)
        assert not torch.allclose(z2[..., cut], z[..., cut])  # the change is seen at all
        if causal:
            assert past_same, f"frames < {cut} changed when samples >= {cut * hop} did"
        leaked |= not past_same
    assert leaked == (not causal)


@pytest.mark.parametrize("causal", [True, False])
def test_decoder_causality_before_istft(causal):
    torch.manual_seed(0)
    cfg = small(causal=causal)
    dec, frames = AudioDecoder(cfg).eval(), 10
    z = torch.randn(1, 8, frames)
    feats = dec.frame_features(z)
    leaked = False
    for cut in range(1, frames):
        f2 = dec.frame_features(perturb_after(z, cut))
        past_same = torch.allclose(f2[..., :cut], feats[..., :cut], atol=1e-6, rtol=0)
        if causal:
            assert past_same, f"frames < {cut} changed when latent frames >= {cut} did"
        leaked |= not past_same
    assert leaked == (not causal)


def test_causal_decoder_waveform_has_a_two_frame_lookahead():
    """After the iSTFT, samples before ``(cut - 2) * hop`` ignore latent frames
    ``>= cut``: each frame's window reaches ``n_fft / 2 = 2 * hop`` samples back."""
    torch.manual_seed(0)
    cfg = small(causal=True)
    dec, frames = AudioDecoder(cfg).eval(), 10
    z = torch.randn(1, 8, frames)
    y = dec(z)
    for cut in range(2, frames):
        y2 = dec(perturb_after(z, cut))
        end = (cut - 2) * cfg.hop
        torch.testing.assert_close(y2[..., :end], y[..., :end], atol=1e-6, rtol=0)
        assert not torch.allclose(y2[..., end : end + cfg.hop], y[..., end : end + cfg.hop])


def test_error_message_names_hop():
    with pytest.raises(ValueError, match="audio length 1000 is not a multiple of hop 320"):
        AudioEncoder(AudioBackboneConfig())(torch.zeros(1, 1, 1000))


@pytest.mark.parametrize(
    ("shape", "match"),
    [((1, 80), "3 axes"), ((1, 2, 80), "2 channels but this backbone expects 1"), ((1, 1, 0), "empty")],
)
def test_encoder_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        AudioEncoder(small())(torch.zeros(shape))


@pytest.mark.parametrize(("shape", "match"), [((8, 5), "3 axes"), ((1, 4, 5), "4 channels")])
def test_decoder_rejects_bad_shapes(shape, match):
    dec = AudioDecoder(small())
    with pytest.raises(ValueError, match=match):
        dec(torch.zeros(shape))
    with pytest.raises(ValueError, match=match):
        dec.frame_features(torch.zeros(shape))


def test_config_rejects_bad_strides():
    with pytest.raises(ValueError, match="strides"):
        AudioBackboneConfig(strides=(2, 0))


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_reach_input_and_last_layer(causal):
    torch.manual_seed(0)
    cfg = small(causal=causal)
    enc, dec = AudioEncoder(cfg), AudioDecoder(cfg)
    x = torch.randn(2, 1, 6 * cfg.hop, requires_grad=True)
    dec(enc(x)).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert any(dec.last_layer is p for p in dec.parameters())
    assert dec.last_layer.grad is not None and dec.last_layer.grad.abs().sum() > 0


def test_output_is_finite_for_large_latents():
    """The log-magnitude clip keeps exp() from overflowing on wild inputs."""
    dec = AudioDecoder(small())
    assert torch.isfinite(dec(1e4 * torch.randn(1, 8, 6))).all()


def test_few_adam_steps_reduce_mse_on_real_speech():
    torch.manual_seed(0)
    flac = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[0]
    wav, sr = sf.read(flac, dtype="float32", frames=8000, start=8000)
    cfg = AudioBackboneConfig(
        sample_rate=sr, channels=8, strides=(2, 4, 5), latent_dim=32, decoder_dim=64, decoder_layers=2
    )
    x = torch.from_numpy(wav)[: len(wav) // cfg.hop * cfg.hop].reshape(1, 1, -1)
    x = 0.5 * x / x.abs().max()
    enc, dec = AudioEncoder(cfg), AudioDecoder(cfg)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=2e-3)
    losses = []
    for _ in range(150):
        loss = (dec(enc(x)) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    power = x.square().mean().item()
    print(f"audio MSE {losses[0]:.5f} -> {losses[-1]:.5f} (signal power {power:.5f})")
    assert losses[-1] < 0.5 * losses[0]
    # Learning silence alone takes MSE down to the signal power (a plateau the
    # first ~80 steps sit on); going well below it means the waveform is modelled.
    assert losses[-1] < 0.6 * power


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_cpu_time_major_layout_computes_the_same_encoder(causal, batch):
    """On the CPU the encoder holds its activations as (B, C, 1, T) channels-last (oneDNN's
    fast layout for few channels and many samples); the latents equal those of PyTorch's
    (B, C, T) convolutions to fp32 rounding in fp32, and to bf16 rounding under bf16 autocast."""
    torch.manual_seed(0)
    enc = AudioEncoder(AudioBackboneConfig(channels=8, strides=(2, 4, 5), latent_dim=16, causal=causal)).eval()
    x = torch.randn(batch, 1, 40 * 37)
    with torch.no_grad():
        z = enc(x)
        ref = enc.layers(x)  # the (B, C, T) path, as on a GPU
        assert z.shape == ref.shape == (batch, 16, 37)
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16, ref16 = enc(x), enc.layers(x)
    assert z16.dtype == torch.bfloat16
    torch.testing.assert_close(z16.float(), ref16.float(), rtol=0.02, atol=0.02 * float(ref16.abs().max()))
