"""The throughput benchmark's rows: real timings of the shipped models, consistent units."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizers_vq.eval.benchmarks.throughput import markdown, measure
from tokenizers_vq.tokenizer import Tokenizer


@pytest.mark.parametrize("name", ["image", "speech"])
def test_rows_time_encode_and_decode_of_a_shipped_model(name):
    row = measure(name, 1, "fp32", torch.device("cpu"), min_seconds=0.0, max_reps=2)
    assert row["unit"] == ("images" if name == "image" else "audio s")
    enc, dec, both = row["encode_per_s"], row["decode_per_s"], row["both_per_s"]
    assert all(math.isfinite(v) and v > 0 for v in (enc, dec, both))
    md = markdown({"device_name": "cpu", "torch": torch.__version__, "threads": 1}, [row])
    assert f"| {name} | 1 | fp32 | no | no |" in md


def test_rates_are_units_of_the_batch_over_the_timed_seconds(monkeypatch):
    """Encode timed at 0.5 s and decode at 0.25 s per batch of 2 images: 4 and 8 images per
    second, 8 / 3 for the two in sequence."""
    from tokenizers_vq.eval.benchmarks import throughput  # noqa: PLC0415

    seconds, ran = iter([0.5, 0.25]), []

    def fake_timed(fn, device, min_seconds, max_reps):
        ran.append(fn().shape)
        return next(seconds)

    monkeypatch.setattr(throughput, "timed", fake_timed)
    row = measure("image", 2, "fp32", torch.device("cpu"))
    assert ran == [(2, 16, 16), (2, 3, 256, 256)]  # the codes of the batch, then its pictures
    assert (row["encode_per_s"], row["decode_per_s"]) == (4.0, 8.0) and row["both_per_s"] == pytest.approx(8 / 3)


def test_channels_last_rows_time_the_same_model_with_the_same_codes(monkeypatch):
    """The image model in channels-last (weights and inputs) gives the codes of the default
    layout; speech has no such layout and is left as it is."""
    from tokenizers_vq.eval.benchmarks import throughput  # noqa: PLC0415

    seen = []
    real = throughput._row

    def spy(label, name, shape, enc, dec, *args):
        seen.append(enc)
        return real(label, name, shape, enc, dec, *args)

    monkeypatch.setattr(throughput, "_row", spy)
    row = measure("image", 1, "fp32", torch.device("cpu"), min_seconds=0.0, max_reps=2, channels_last=True)
    assert row["channels_last"] is True and row["encode_per_s"] > 0
    assert "| image | 1 | fp32 | no | yes |" in markdown({"device_name": "cpu", "torch": "-", "threads": 1}, [row])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain, timed_model = Tokenizer.from_pretrained("image").eval(), seen[0].__self__
    assert timed_model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the same latents (codes could differ at a near-tie on another CPU's kernels)
        torch.testing.assert_close(timed_model.encoder(x.contiguous(memory_format=torch.channels_last)),
                                   plain.encoder(x), rtol=1e-4, atol=1e-4)
    assert measure("speech", 1, "fp32", torch.device("cpu"), min_seconds=0.0, max_reps=1,
                   channels_last=True)["channels_last"] is False


def test_image_peer_row_times_our_backbone_with_the_outside_quantizer():
    pytest.importorskip("vector_quantize_pytorch")
    from tokenizers_vq.eval.benchmarks.throughput import measure_peer

    row = measure_peer("image", 2, "fp32", torch.device("cpu"), min_seconds=0.0, max_reps=2)
    assert row["model"].startswith("image peer: ") and row["unit"] == "images"
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("encode_per_s", "decode_per_s", "both_per_s"))
    assert f"| {row['model']} | 2 | fp32 | no | no |" in markdown({"device_name": "cpu", "torch": "-", "threads": 1}, [row])


def test_the_picture_draws_a_line_per_setting_against_batch(tmp_path, monkeypatch):
    import matplotlib.axes
    from PIL import Image

    from tokenizers_vq.eval.benchmarks.plots import throughput_plot

    def row(model, batch, both, unit="images", **kw):
        return {"model": model, "batch": batch, "precision": "bf16", "unit": unit, "both_per_s": both,
                "encode_per_s": 2 * both, "decode_per_s": 2 * both, **kw}

    rows = [row("image", 16, 1000.0), row("image", 1, 140.0), row("image", 64, 3000.0, compile=True),
            row("speech", 1, 1200.0, unit="audio s"), {"model": "image peer", "batch": 1, "precision": "bf16", "error": "x"}]
    result = {"meta": {"device_name": "test"}, "rows": rows}
    with Image.open(throughput_plot(result, tmp_path / "t.png")) as im:
        assert im.format == "PNG" and im.width > im.height  # two panels side by side
    lines = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, xs, ys, **k: lines.__setitem__(k["label"], (xs, ys)))
    throughput_plot(result, tmp_path / "again.png")
    assert lines == {"image, bf16": ([1, 16], [140.0, 1000.0]), "image, bf16, compiled": ([64], [3000.0]),
                     "speech, bf16": ([1], [1200.0])}  # batches in order; the failed row left out
