"""Metrics against known values and properties, on constructed and real inputs."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from testdata import shared_path

from tokenizers_vq.eval.metrics import (
    PESQ_WB_MIN,
    PSNR_CAP_DB,
    SPECTRAL_MIN_SAMPLES,
    audio_metrics,
    colour_shift,
    ms_ssim,
    psnr,
    ssim,
    token_stats,
)
from tokenizers_vq.media import load_image
from tokenizers_vq.media import load_audio
from tokenizers_vq.spectral import multiscale_mel_distance, si_sdr


def test_psnr_of_a_constructed_pair():
    x = torch.rand(3, 20, 30)
    y = x + 0.1 * torch.where(torch.rand_like(x) < 0.5, 1.0, -1.0)  # MSE exactly 0.01
    assert psnr(y, x) == pytest.approx(20.0, abs=1e-4)  # fp32 rounding of x + 0.1
    assert psnr(x, x) == PSNR_CAP_DB and psnr(x, x + 1e-9) == PSNR_CAP_DB  # finite: means and JSON stay numbers
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(x, x[:, :-1])


def test_colour_shift_is_the_largest_channel_mean_error_in_8_bit_levels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 40, 50, generator=g) * 0.8 + 0.1
    y = x.clone()
    y[1] += 10 / 255  # green 10 levels up
    y[2] -= 4 / 255
    assert colour_shift(y, x) == pytest.approx(10.0, abs=1e-3) and colour_shift(x, x) == 0
    flip = torch.where(torch.rand(x.shape, generator=g) < 0.5, 1.0, -1.0)
    noisy = x + 0.05 * (flip - flip.mean(dim=(1, 2), keepdim=True))  # noise with no mean per channel: no cast
    assert colour_shift(noisy, x) < 1e-3 and psnr(noisy, x) < 30
    frames = torch.rand(5, 3, 8, 8, generator=g)
    later = frames.clone()
    later[:, 0] -= 6 / 255  # every frame's red
    assert colour_shift(later, frames) == pytest.approx(6.0, abs=1e-3)
    blink = frames + torch.tensor([20 / 255, -20 / 255] * 2 + [20 / 255]).view(5, 1, 1, 1)  # opposite casts by turns
    assert colour_shift(blink, frames) == pytest.approx(20.0, abs=1e-3)  # each frame's own: they do not cancel
    with pytest.raises(ValueError, match="equal shapes"):
        colour_shift(x, x[:, :-1])
    with pytest.raises(ValueError, match=r"needs pictures \(\.\.\., C, H, W\), got a tensor of shape \(40, 50\)"):
        colour_shift(x[0], x[0])


def test_the_embedded_video_model_keeps_the_colour_of_frames_larger_than_its_crops():
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from tokenizers_vq import Tokenizer  # noqa: PLC0415
    from tokenizers_vq.media import load_video  # noqa: PLC0415

    tok = Tokenizer.from_pretrained("video").eval()
    frames, _ = load_video(shared_path("video", "cotracker", "cat.mp4"), 9)  # (9, 3, 480, 368), never trained on
    with torch.no_grad():
        x = frames.transpose(0, 1)[None] * 2 - 1
        rec = ((tok.decode(tok.encode(x), size=x.shape[2:])[0].transpose(0, 1) + 1) / 2).clamp(0, 1)
    assert colour_shift(rec, frames) < 6.5  # 3.5 levels; 17.9 for weights trained on 128-pixel crops only
    assert psnr(rec, frames) > 29  # 30.3 dB; 23.9 for those weights


def test_ssim_is_one_on_identical_images_and_falls_with_noise():
    img = load_image(shared_path("images", "bsds500", "val", "3096.jpg"))
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-6)
    assert ms_ssim(img, img) == pytest.approx(1.0, abs=1e-6)
    noisy = [(img + s * torch.randn_like(img)).clamp(0, 1) for s in (0.02, 0.05, 0.1)]
    values = [ssim(n, img) for n in noisy]
    assert values[0] > values[1] > values[2] > 0
    assert ms_ssim(img[:, :100, :100], img[:, :100, :100]) is None  # too small for 5 scales


def test_ssim_of_an_image_under_the_window_smooths_with_a_window_that_fits():
    import warnings  # noqa: PLC0415

    img = load_image(shared_path("images", "bsds500", "val", "3096.jpg"))[:, 100:109, 200:240]  # 9 x 40
    noisy = (img + 0.05 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pytorch-msssim warns where it skips the smoothing along a side
        value = ssim(noisy, img)
    pm = pytest.importorskip("pytorch_msssim")
    assert value == pytest.approx(float(pm.ssim(noisy[None], img[None], data_range=1.0, win_size=9)), abs=1e-6)
    assert 0 < value < 1


def test_si_sdr_matches_the_construction():
    torch.manual_seed(0)
    ref = torch.randn(16000)
    noise = torch.randn(16000)
    noise -= (noise @ ref) / (ref @ ref) * ref  # orthogonal to the reference
    noise *= (ref.norm() / noise.norm()) * 10 ** (-15 / 20)  # 15 dB below
    assert float(si_sdr(3.0 * ref + 3.0 * noise, ref)) == pytest.approx(15.0, abs=1e-3)


def test_si_sdr_is_scale_invariant_down_to_quiet_estimates_and_undefined_for_silence():
    g = torch.Generator().manual_seed(0)
    ref, est = torch.randn(16000, generator=g), torch.randn(16000, generator=g)
    loud = float(si_sdr(est, ref))
    assert loud < -20  # unrelated noise
    for scale in (1e-3, 1e-6, 1e-9):  # a near-silent reconstruction scores as the same one louder
        assert float(si_sdr(scale * est, ref)) == pytest.approx(loud, abs=0.01)
    assert float(si_sdr(torch.zeros(16000), ref)) == pytest.approx(-80.0)  # silence: the worst score
    assert float(si_sdr(torch.full((16000,), 0.01), ref)) == pytest.approx(-80.0)  # constant: silent once centred
    assert math.isnan(float(si_sdr(est, torch.zeros(16000))))  # nothing to measure against


def _speech(seconds: float) -> torch.Tensor:
    flac = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[3]
    return load_audio(flac, 16000)[0][0, : int(16000 * seconds)]


def test_undefined_audio_metrics_are_none_with_a_note_not_placeholders():
    pytest.importorskip("pesq", reason="the pesq package is needed for PESQ")
    pytest.importorskip("pystoi", reason="the pystoi package is needed for STOI")
    ref = _speech(3)
    silent_rec = audio_metrics(torch.zeros_like(ref), ref, 16000)  # a collapsed model: the worst scores
    noise_rec = audio_metrics(torch.randn_like(ref) * ref.std(), ref, 16000)
    assert silent_rec["pesq_wb"] == PESQ_WB_MIN < noise_rec["pesq_wb"] and silent_rec["stoi"] == 0.0
    assert silent_rec["si_sdr_db"] == pytest.approx(-80.0) and noise_rec["si_sdr_db"] > -79
    assert audio_metrics(torch.zeros(1600), ref[:1600], 16000)["pesq_wb"] is None  # 0.1 s: PESQ cannot score it
    silence = audio_metrics(ref, torch.zeros_like(ref), 16000)  # nothing to compare with
    assert silence["stoi"] is None and "silent" in silence["stoi_note"]
    assert silence["stft_distance"] is None and silence["si_sdr_db"] is None
    assert math.isfinite(silence["mel_distance"])
    short = audio_metrics(ref[:4000] * 0.9, ref[:4000], 16000)  # 0.25 s: too short for STOI's segments
    assert short["stoi"] is None and "too short" in short["stoi_note"]
    assert short["mel_distance"] is not None
    tiny = audio_metrics(ref[:500] * 0.9, ref[:500], 16000)  # under the widest spectral window
    assert tiny["mel_distance"] is None and tiny["stft_distance"] is None
    assert str(SPECTRAL_MIN_SAMPLES) in tiny["mel_distance_note"]
    assert tiny["si_sdr_db"] == pytest.approx(80.0, abs=0.01)  # needs no window: a scaled copy, at the +80 dB cap
    assert audio_metrics(ref[:SPECTRAL_MIN_SAMPLES], ref[:SPECTRAL_MIN_SAMPLES], 16000)["mel_distance"] == 0.0
    for n in (80, 400):  # shorter than one STOI frame (25.6 ms): a note, and the other metrics kept
        clip = audio_metrics(ref[:n] * 0.9, ref[:n], 16000)
        assert clip["stoi"] is None and "shorter than one of its 25.6 ms frames" in clip["stoi_note"]
        assert clip["si_sdr_db"] is not None


def test_speech_metrics_fall_monotonically_with_added_noise():
    pytest.importorskip("pesq", reason="the pesq package is needed for PESQ")
    pytest.importorskip("pystoi", reason="the pystoi package is needed for STOI")
    ref = _speech(4)
    torch.manual_seed(0)
    noise = torch.randn_like(ref) * ref.std()
    rows = [audio_metrics(ref + a * noise, ref, 16000) for a in (0.01, 0.1, 0.5)]
    assert rows[0]["pesq_wb"] > rows[1]["pesq_wb"] > rows[2]["pesq_wb"]
    assert rows[0]["stoi"] > rows[1]["stoi"] > rows[2]["stoi"]
    assert rows[0]["mel_distance"] < rows[1]["mel_distance"] < rows[2]["mel_distance"]
    assert audio_metrics(ref, ref, 16000)["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert float(multiscale_mel_distance(ref, ref, 16000)) == 0.0


def test_missing_optional_packages_give_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)
    monkeypatch.setitem(sys.modules, "pystoi", None)
    m = audio_metrics(torch.randn(8000), torch.randn(8000), 16000)
    assert m["pesq_wb"] is None and m["stoi"] is None and math.isfinite(m["mel_distance"])


def test_token_stats():
    k = 16
    uniform = torch.arange(k).repeat(10).unsqueeze(1)
    s = token_stats(uniform, k)
    assert s == {"usage": 1.0, "usage_ceiling": 1.0, "perplexity": pytest.approx(16.0),
                 "entropy_bits": pytest.approx(4.0)}
    one = torch.zeros(50, 1, dtype=torch.long)
    assert token_stats(one, k) == {"usage": 1 / 16, "usage_ceiling": 1.0, "perplexity": 1.0, "entropy_bits": 0.0}
    # fewer tokens than codes: usage can reach 12 / 64 at most, and these reach it
    few = token_stats(torch.arange(12).unsqueeze(1), 64)
    assert few["usage"] == few["usage_ceiling"] == 12 / 64


def test_spectral_distances_name_audio_too_short_for_their_fft():
    from tokenizers_vq.spectral import multires_stft_distance, stft_magnitude  # noqa: PLC0415

    short = torch.randn(1, 1000)
    for call in (lambda: multiscale_mel_distance(short, short, 16000), lambda: multires_stft_distance(short, short),
                 lambda: stft_magnitude(short, 2048, 512)):
        with pytest.raises(ValueError, match="1000 samples are too few for an FFT of 2048 \\(more than 1024 needed\\)"):
            call()
    assert stft_magnitude(torch.randn(1, 1025), 2048, 512).shape == (1, 1025, 3)
