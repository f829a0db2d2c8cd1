"""The modality registry: every modality loads a real file into model space, turns model
space back into media, writes it and reads it back, pads to a stride and counts cells."""

from __future__ import annotations

import pytest
import torch
from testdata import shared_path

from tokenizers_vq import modality
from tokenizers_vq.tokenizer import PRETRAINED

FILES = {
    "image": ("images", "bsds500", "val", "101085.jpg"),
    "audio": ("audio", "ljspeech", "LJ001-0001.wav"),
    "video": ("video", "imageio_realshort.mp4"),
}


@pytest.mark.parametrize("name", modality.names())
def test_a_real_file_goes_to_model_space_and_back_to_a_file(name, tmp_path):
    if name == "video":
        pytest.importorskip("av")
    kind = modality.get(name)
    path = shared_path(*FILES[name])
    assert path.suffix.lower() in kind.suffixes and kind.default_model in PRETRAINED
    x, size, info = kind.load(path, sample_rate=16000, max_frames=5)
    assert x.ndim + 1 == kind.input_ndim and list(x.shape[1:]) == size
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    media = kind.to_media(x)
    out = kind.save(media, tmp_path / f"back{kind.output_suffix}", 16000, info)
    y, size_back, _ = kind.load(out, sample_rate=16000, max_frames=5)
    assert size_back[-2:] == size[-2:] if kind.has_pixels else size_back == size
    if name == "audio":  # lossless: 16-bit WAV
        torch.testing.assert_close(y, x, atol=1 / 2**14, rtol=0)
    elif name == "image":  # lossless: 8-bit PNG of an 8-bit JPEG's decode
        torch.testing.assert_close(y, x, atol=1 / 127, rtol=0)
    else:  # H.264: lossy, but the same pictures
        assert (y - x).abs().mean() < 0.1
    # what rates and metrics count on this item: seconds at the file's rate, pixels
    loaded = kind.load_media(path, 16000, 5)
    rate = info.get("fps", info.get("sample_rate", 0))
    expected_seconds = {"image": 0.0, "audio": size[0] / 16000, "video": size[0] / (rate or 1)}[name]
    assert kind.seconds(loaded, rate) == pytest.approx(expected_seconds)
    assert kind.pixels(loaded) == (0 if name == "audio" else (size[0] if name == "video" else 1) * size[-1] * size[-2])
    assert (kind.streams, kind.fid, kind.clips) == (name == "audio", name == "image", name == "video")
    # the evaluation's reference: media as to_media gives it (audio without its channel axis), with its rate
    ref, ref_rate = kind.load_reference(path, 16000, 5)
    expected = kind.to_media(x)
    torch.testing.assert_close(ref, expected[0] if name == "audio" else expected, atol=1 / 254, rtol=0)
    assert ref_rate == pytest.approx({"image": 0.0, "audio": 16000.0, "video": rate}[name])
    if name == "audio":  # no rate asked: the file's own
        assert kind.load_reference(path)[1] == 22050  # LJSpeech


def test_padding_counts_and_errors():
    img, wav, vid = (modality.get(n) for n in ("image", "audio", "video"))
    x = torch.rand(1, 3, 20, 33) * 2 - 1
    p = img.pad(x, (16, 16))
    assert p.shape == (1, 3, 32, 48) and torch.equal(p[..., :20, :33], x)
    assert torch.equal(p[..., 31, 47], x[..., 19, 32])  # replicated edge
    a = wav.pad(torch.ones(2, 1, 250), (240,))
    assert a.shape == (2, 1, 480) and a[..., 250:].abs().sum() == 0  # zeros after the audio
    v = vid.pad_time(vid.pad(torch.rand(1, 3, 6, 9, 9), (8, 8)), 4)
    assert v.shape == (1, 3, 9, 16, 16) and torch.equal(v[:, :, 8], v[:, :, 5])  # last frame repeated
    assert img.grid((600, 512), (16, 16)) == (38, 32) and wav.grid((16001,), (240,)) == (67,)
    assert vid.grid((17, 144, 176), (8, 8)) == (18, 22)
    assert img.region_cells == 4 and wav.region_cells == 2 and vid.region_cells is None
    with pytest.raises(ValueError, match="unknown modality 'text'; choose from \\['audio', 'image', 'video'\\]"):
        modality.get("text")


def test_compact_inputs_expand_to_the_model_input_bit_for_bit():
    """What the export's loader workers send (uint8 pixels for images and video files) expands to exactly
    what ``load`` gives, so the export's ids do not depend on the transport."""
    for name in modality.names():
        if name == "video":
            pytest.importorskip("av")
        kind = modality.get(name)
        path = shared_path(*FILES[name])
        x, size, info = kind.load(path, sample_rate=16000, max_frames=5)
        c, size_c, info_c = kind.load_compact(path, sample_rate=16000, max_frames=5)
        assert (size_c, info_c) == (size, info)
        assert c.dtype == (torch.uint8 if name in ("image", "video") else x.dtype)
        assert torch.equal(kind.expand(c[None])[0], x)

