"""The embedded speech and video tokenizers: picked by file type, named, round trips of
real recordings through the command line, and the errors for a wrong combination."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_tokenizer import tiny
from testdata import shared_path

from tokenizers_vq.cli import main
from tokenizers_vq.eval.metrics import audio_metrics, psnr
from tokenizers_vq.media import load_audio, load_video
from tokenizers_vq.tokenizer import DEFAULT_FOR_MODALITY, PRETRAINED, Tokenizer
from tokenizers_vq.tokens import default_model_name, load_tokens

LIBRISPEECH = ("audio", "librispeech_train-clean-100")


def held_apart_flac():
    """A LibriSpeech speaker the speech model never trained on (the last 10% of speakers)."""
    files = sorted(shared_path(*LIBRISPEECH).glob("*.flac"))
    return files[-1]


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_embedded_models_ship_inside_the_package_small_and_named(name):
    weights = PRETRAINED[name] / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 16 * 2**20
    with safe_open(str(weights), framework="pt") as f:  # an edited config.json and damaged bytes are refused
        assert {"architecture_sha256", "tensors_sha256"} <= set(f.metadata())
    tok = Tokenizer.from_pretrained(name)
    if name == "speech-rvq":  # the one that is not a modality's default
        assert tok.modality == "audio" and tok.num_codebooks == 4 and tok.frame_rate == pytest.approx(16000 / 240)
        assert tok.bits_per_token() * tok.num_codebooks * tok.frame_rate == pytest.approx(3200)
    else:
        assert DEFAULT_FOR_MODALITY[tok.modality] == name
        assert tok.num_codebooks == 1 and tok.codebook_size == tok.quantizer.codebook_size


def test_speech_model_exposes_the_compression_model_attributes():
    tok = Tokenizer.from_pretrained("speech")
    assert tok.sample_rate == 16000 and tok.frame_rate == pytest.approx(16000 / 240)
    assert (tok.codebook_size, tok.num_codebooks) == (65536, 1)
    assert Tokenizer.from_pretrained("image").frame_rate is None


def test_default_is_picked_by_file_type(tmp_path):
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    wav = sorted(shared_path("audio", "ljspeech").glob("*.wav"))[0]
    clip = shared_path("video", "imageio_realshort.mp4")
    assert default_model_name([photo]) == "image"
    assert default_model_name([wav, held_apart_flac()]) == "speech"
    assert default_model_name([clip]) == "video"
    with pytest.raises(ValueError, match="mix audio and image"):
        default_model_name([wav, photo])


@pytest.mark.parametrize("source", [
    ("audio", "librispeech_train-clean-100", None),
    ("audio", "ljspeech", "LJ001-0001.wav"),
    ("audio", "librosa", "5703-47212-0000.hq.ogg"),
])
def test_tvq_encode_of_speech_needs_no_model_and_decodes_at_the_model_rate(source, tmp_path):
    *folder, name = source
    path = held_apart_flac() if name is None else shared_path(*folder, name)
    tokens, decoded = tmp_path / "talk.tvq", tmp_path / "talk.wav"
    assert main(["encode", str(path), "-o", str(tokens), "--device", "cpu"]) == 0
    meta, [rec] = load_tokens(tokens)
    assert meta["modality"] == "audio" and meta["model_id"] == Tokenizer.from_pretrained("speech").config.name
    assert main(["decode", str(tokens), "-o", str(decoded), "--device", "cpu"]) == 0
    ref, _ = load_audio(path, 16000)
    out, sr = load_audio(decoded)
    assert sr == 16000 and out.shape[-1] == ref.shape[-1] == rec.size[0]
    assert rec.codes.shape[0] == -(-ref.shape[-1] // 240)  # 66.7 tokens per second


def test_speech_model_keeps_a_held_apart_speaker_intelligible(tmp_path):
    """A floor well under the model card's mean (STOI 0.85 on 25 held-apart speakers),
    so a broken checkpoint or decode path fails while a retrained one passes."""
    pytest.importorskip("pystoi")
    tok = Tokenizer.from_pretrained("speech")
    wav, _ = load_audio(held_apart_flac(), tok.sample_rate)
    x = wav.mean(0, keepdim=True)[None, :, : 5 * tok.sample_rate]
    rec = tok.decode(tok.encode(x), size=(x.shape[-1],))
    m = audio_metrics(rec[0, 0], x[0, 0], tok.sample_rate)
    assert m["stoi"] > 0.7, m


def test_tvq_encode_of_a_video_needs_no_model_and_keeps_size_and_fps(tmp_path):
    clip = shared_path("video", "imageio_realshort.mp4")
    tokens, decoded = tmp_path / "clip.tvq", tmp_path / "clip.mp4"
    assert main(["encode", str(clip), "-o", str(tokens), "--device", "cpu"]) == 0
    meta, [rec] = load_tokens(tokens)
    assert meta["modality"] == "video" and rec.codes.shape[1:] == (30, 40)  # 240x320 / 8
    assert main(["decode", str(tokens), "-o", str(decoded), "--device", "cpu"]) == 0
    ref, fps = load_video(clip)
    out, out_fps = load_video(decoded)
    assert out.shape == ref.shape and out_fps == pytest.approx(fps, rel=1e-3)
    assert psnr(out, ref) > 18  # the model card's held-apart mean is higher; this catches a broken path


def test_the_embedded_video_model_keeps_mid_grey_on_small_frames():
    tok = Tokenizer.from_pretrained("video").eval()
    for side in (16, 32, 64):
        grey = torch.zeros(1, 3, 9, side, side)  # 127.5 of 255
        with torch.no_grad():
            level = float((tok.decode(tok.encode(grey), size=grey.shape[2:]) + 1).mean() * 127.5)
        # 143.7, 133.6, 125.3 (the card lists each size; each decayed call moved 2 x 2 tokens a frame brighter,
        # 0.2 levels past the 16 this allowed before); the call-10 weights' 108 (19.5 off) fails it
        assert abs(level - 127.5) < 17, (side, level)


@pytest.mark.parametrize("files, model, expected", [
    (["speech"], "image", r"is an audio file, but model 'tvq-image-f16.*' is an image tokenizer.*leave out --model"),
    (["video"], "speech", r"is a video file, but model 'tvq-speech16k.*' is an audio tokenizer.*'video'"),
    (["photo"], "video", r"is an image file, but model 'tvq-video.*' is a video tokenizer"),
    (["speech", "photo"], None, r"mix audio and image files.*encode each kind in its own call"),
])
def test_bad_combinations_are_one_line_errors_naming_the_model_and_the_fix(files, model, expected, tmp_path, capsys):
    paths = {
        "speech": held_apart_flac(),
        "video": shared_path("video", "imageio_realshort.mp4"),
        "photo": sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0],
    }
    args = ["encode", *[str(paths[f]) for f in files], "-o", str(tmp_path / "x.tvq"), "--device", "cpu"]
    assert main(args + (["--model", model] if model else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tvq: error:")
    assert __import__("re").search(expected, err), err
    assert not (tmp_path / "x.tvq").exists()


def test_decode_without_model_refuses_tokens_of_another_model(tmp_path, capsys):
    tok = Tokenizer.from_pretrained("speech")
    renamed = tmp_path / "other"
    tok.config.name = "someone-elses-speech-model"
    tok.save_pretrained(renamed)
    tokens = tmp_path / "t.tvq"
    assert main(["encode", str(held_apart_flac()), "-o", str(tokens), "--model", str(renamed), "--device", "cpu"]) == 0
    assert main(["decode", str(tokens), "-o", str(tmp_path / "t.wav"), "--device", "cpu"]) == 2
    assert "someone-elses-speech-model" in capsys.readouterr().err
    assert main(["decode", str(tokens), "-o", str(tmp_path / "t.wav"), "--model", str(renamed), "--device", "cpu"]) == 0


def test_a_folder_named_like_an_embedded_model_is_not_taken_for_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "speech").mkdir()
    assert Tokenizer.from_pretrained("speech").modality == "audio"
    assert torch.equal(Tokenizer.from_pretrained("speech").encoder.layers[0].weight,
                       Tokenizer.from_pretrained(str(PRETRAINED["speech"])).encoder.layers[0].weight)

    tiny("image").save_pretrained(tmp_path / "image")  # a user's model saved as ./image: still the embedded one, said
    with pytest.warns(UserWarning, match=r"'image' names the embedded model, not the tokenizer in ./image: pass './image'"):
        assert Tokenizer.from_pretrained("image").config.name == Tokenizer.from_pretrained(str(PRETRAINED["image"])).config.name
    assert Tokenizer.from_pretrained("./image").config.name == tiny("image").config.name != "tvq-image-f16-vq1024"

    with pytest.raises(ValueError, match=r"Speech is missing \(or name an embedded model: image, speech, speech-rvq, video\)"):
        Tokenizer.from_pretrained("Speech")  # a misspelt name: the names it could have meant
    with pytest.raises(ValueError, match=r"speech/config.json is missing$"):
        Tokenizer.from_pretrained(tmp_path / "speech")  # a folder given as a path: no name list


def test_readme_speech_and_video_commands_run_on_real_files(tmp_path, monkeypatch):
    """The README's second bash block, with its placeholder files replaced by real ones."""
    import re
    import shlex

    from testdata import REPO

    block = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1]
    real = {"talk.flac": str(held_apart_flac()), "clip.mp4": str(shared_path("video", "imageio_realshort.mp4"))}
    monkeypatch.chdir(tmp_path)
    lines = block.strip().splitlines()
    assert [name for name in real if any(name in line for line in lines)] == list(real)
    for line in lines:
        for cmd in line.split("&&"):
            argv = [real.get(a, a) for a in shlex.split(cmd)]
            assert argv[0] == "tvq" and main(argv[1:] + ["--device", "cpu"]) == 0, cmd
    assert load_audio(tmp_path / "talk_decoded.wav")[1] == 16000
    assert load_video(tmp_path / "clip_decoded.mp4")[0].shape[-2:] == (240, 320)
