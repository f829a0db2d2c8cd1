"""Token files guard what is already on disk: no token file over media, no decoded item over
another or over its original, no altered header decoded as if it were whole."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_tokenizer import tiny
from testdata import shared_path, small_photos

from tokenizers_vq.cli import main
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokens import load_tokens


@pytest.fixture()
def image_model(tmp_path):
    return tiny("image").save_pretrained(tmp_path / "image_model")


def read_raw(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_token_file_named_as_media_or_as_an_input_is_refused_and_the_input_kept(tmp_path, image_model, capsys):
    photo = small_photos(tmp_path / "photos", 1)[0]
    before = photo.read_bytes()
    for out in (photo, tmp_path / "tokens.jpg", tmp_path / "tokens.wav", tmp_path / "tokens.mp4"):
        capsys.readouterr()
        assert main(["encode", str(photo), "--model", str(image_model), "-o", str(out)]) == 2
        err = one_error_line(capsys)
        assert "would be written over media" in err and ".tvq" in err
        assert out == photo or not out.exists()
    assert photo.read_bytes() == before
    assert main(["encode", str(photo), "--model", str(image_model), "-o", str(tmp_path / "tokens.bin")]) == 0


def test_items_of_one_name_decode_to_files_of_their_own(tmp_path, image_model):
    a, b = small_photos(tmp_path / "a", 2)
    (tmp_path / "b").mkdir()
    same = shutil.copy(b, tmp_path / "b" / a.name)  # another photo under a's name
    tokens = tmp_path / "t.tvq"
    assert main(["encode", str(a), str(same), str(b), "--model", str(image_model), "-o", str(tokens)]) == 0
    out = tmp_path / "decoded"
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{a.stem}-0.png", f"{a.stem}-1.png", f"{b.stem}.png"])
    # the two photos named alike decode as the two different photos they were
    assert (out / f"{a.stem}-1.png").read_bytes() == (out / f"{b.stem}.png").read_bytes()
    assert (out / f"{a.stem}-0.png").read_bytes() != (out / f"{b.stem}.png").read_bytes()


def test_decoding_over_the_original_is_refused_before_anything_is_written(tmp_path, image_model, capsys):
    photos = small_photos(tmp_path / "photos", 2)
    before = [p.read_bytes() for p in photos]
    tokens = tmp_path / "t.tvq"
    assert main(["encode", *map(str, photos), "--model", str(image_model), "-o", str(tokens)]) == 0
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(tmp_path / "photos")]) == 2
    assert "the decoded copy would replace the original" in one_error_line(capsys)
    assert [p.read_bytes() for p in photos] == before
    single = tmp_path / "t1.tvq"
    assert main(["encode", str(photos[0]), "--model", str(image_model), "-o", str(single)]) == 0
    assert main(["decode", str(single), "--model", str(image_model), "-o", str(photos[0])]) == 2
    assert photos[0].read_bytes() == before[0]
    copy = tmp_path / "copy.png"
    assert main(["decode", str(single), "--model", str(image_model), "-o", str(copy)]) == 0
    assert main(["decode", str(single), "--model", str(image_model), "-o", str(copy)]) == 0  # its own output: rewritten
    out = tmp_path / "decoded"
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in photos)
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(out), "--overwrite"]) == 0


def test_a_folder_decode_replaces_no_file_unless_told_to(tmp_path, image_model, capsys):
    photos = small_photos(tmp_path / "photos", 3)
    tokens = tmp_path / "t.tvq"
    assert main(["encode", *map(str, photos), "--model", str(image_model), "-o", str(tokens)]) == 0
    out = tmp_path / "decoded"
    out.mkdir()
    mine = out / f"{photos[1].stem}.png"  # a file of the user's under an item's name
    mine.write_bytes(b"not a decode")
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"{mine} exists" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == [mine.name] and mine.read_bytes() == b"not a decode"
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in photos)
    assert mine.read_bytes() != b"not a decode"
    (out / f"{photos[2].stem}.png").unlink()  # two left of three: the count says so
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(out)]) == 2
    assert "(and 1 more of the 3 files to write)" in one_error_line(capsys)
    single = tmp_path / "one.tvq"  # a file named by the caller is the caller's to replace
    assert main(["encode", str(photos[0]), "--model", str(image_model), "-o", str(single)]) == 0
    assert main(["decode", str(single), "--model", str(image_model), "-o", str(mine)]) == 0


@pytest.mark.parametrize("damage", ["dtype", "no codebook_size", "codebook_size superscript", "code_shape not json",
                                    "items not a list", "size not numbers", "fps None", "fps 0", "pixel_aspect text",
                                    "pixel_aspect 0"])
def test_a_damaged_header_is_one_error_naming_the_file(tmp_path, image_model, capsys, damage):
    tokens = tmp_path / "t.tvq"
    assert main(["encode", *map(str, small_photos(tmp_path / "p", 1)), "--model", str(image_model),
                 "-o", str(tokens)]) == 0
    meta, tensors = read_raw(tokens)
    items = json.loads(meta["items"])
    if damage == "dtype":  # the same bytes, read as float
        tensors["codes.0"] = tensors["codes.0"].view(torch.float32)
    elif damage == "no codebook_size":
        del meta["codebook_size"]
    elif damage == "codebook_size superscript":  # a digit to str.isdigit, not to int()
        meta["codebook_size"] = "\u00b2"
    elif damage == "code_shape not json":
        meta["code_shape"] = "[1,"
    elif damage == "items not a list":
        meta["items"] = json.dumps({"0": items[0]})
    else:  # a field of the item (another program may have written the file)
        field, value = {"size not numbers": ("size", ["abc", 64]), "fps None": ("fps", None), "fps 0": ("fps", 0),
                        "pixel_aspect text": ("pixel_aspect", ["a", 1]), "pixel_aspect 0": ("pixel_aspect", [0, 1])}[damage]
        items[0][field] = value
        meta["items"] = json.dumps(items)
    if damage != "dtype":
        meta.pop("header_sha256")  # also without the header's digest, the fields are checked
    save_file(tensors, str(tokens), metadata=meta)
    with pytest.raises(ValueError, match=f"corrupt token file {tokens}"):
        load_tokens(tokens)
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(tmp_path / "out.png")]) == 2
    assert str(tokens) in one_error_line(capsys)
    assert not (tmp_path / "out.png").exists()


def test_an_id_past_the_codebook_in_a_later_item_is_refused_before_any_item_is_written(tmp_path, image_model, capsys):
    tokens, out = tmp_path / "t.tvq", tmp_path / "out"
    photos = small_photos(tmp_path / "p", 2)
    assert main(["encode", *map(str, photos), "--model", str(image_model), "-o", str(tokens)]) == 0
    meta, tensors = read_raw(tokens)
    items = json.loads(meta["items"])
    for item in items:  # a file written without digests (another program's), ids past the codebook in item 1
        item.pop("sha256", None)
    tensors["codes.1"][0, 0] = 5000
    meta.pop("header_sha256")
    save_file(tensors, str(tokens), metadata={**meta, "items": json.dumps(items)})
    out.mkdir()
    kept = out / (photos[0].stem + ".png")
    kept.write_bytes(b"precious")
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"{tokens}: item 1" in err and "5000" in err and "codes must be integers in [0," in err
    assert kept.read_bytes() == b"precious" and [p.name for p in out.iterdir()] == [kept.name]


def test_an_altered_header_fails_its_digest(tmp_path, image_model):
    tokens = tmp_path / "t.tvq"
    assert main(["encode", *map(str, small_photos(tmp_path / "p", 1)), "--model", str(image_model),
                 "-o", str(tokens)]) == 0
    meta, tensors = read_raw(tokens)
    items = json.loads(meta["items"])
    items[0]["size"][0] -= 1  # still a size the codes fit: only the digest can tell
    save_file(tensors, str(tokens), metadata={**meta, "items": json.dumps(items)})
    with pytest.raises(ValueError, match="does not match its recorded header_sha256"):
        load_tokens(tokens)


def test_decoding_with_another_model_of_the_same_codes_warns(tmp_path, image_model, capsys):
    tokens = tmp_path / "t.tvq"
    assert main(["encode", *map(str, small_photos(tmp_path / "p", 1)), "--model", str(image_model),
                 "-o", str(tokens)]) == 0
    other = tiny("image")
    other.config.name = "someone-elses-model"
    other_dir = other.save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(other_dir), "-o", str(tmp_path / "out.png")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "someone-elses-model" in err and load_tokens(tokens)[0]["model_id"] in err
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(tmp_path / "out2.png")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_tokens_of_an_embedded_model_decode_with_it_without_naming_it(tmp_path, capsys):
    wav, sr = sf.read(str(sorted(shared_path("audio", "fsdd").glob("*.wav"))[0]))
    sf.write(tmp_path / "digit.wav", wav[:4000], sr)
    tokens = tmp_path / "t.tvq"
    assert main(["encode", str(tmp_path / "digit.wav"), "--model", "speech-rvq", "-o", str(tokens), "--device", "cpu"]) == 0
    assert main(["decode", str(tokens), "-o", str(tmp_path / "back.wav"), "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
    back, rate = sf.read(str(tmp_path / "back.wav"))
    assert rate == 16000 and abs(len(back) - 4000 * 16000 / sr) <= 1


def test_decoding_with_other_weights_under_the_same_name_warns(tmp_path, image_model, capsys):
    tokens = tmp_path / "t.tvq"
    assert main(["encode", *map(str, small_photos(tmp_path / "p", 1)), "--model", str(image_model),
                 "-o", str(tokens)]) == 0
    retrained = tiny("image")
    with torch.no_grad():
        retrained.decoder.conv_out.bias += 0.1  # a decoder trained further, the name kept
    other = retrained.save_pretrained(tmp_path / "retrained")
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(other), "-o", str(tmp_path / "out.png")]) == 0
    err = capsys.readouterr().err
    assert "with other weights" in err and err.count("warning") == 1  # said once, by tvq
    from tokenizers_vq.tokens import OtherModelWarning, decode_file  # noqa: PLC0415

    with pytest.warns(OtherModelWarning, match="with other weights"):  # the Python API says it too
        decode_file(Tokenizer.from_pretrained(other), tokens, tmp_path / "api.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherModelWarning)
        decode_file(Tokenizer.from_pretrained(image_model), tokens, tmp_path / "own.png")


def test_tokens_of_a_model_trained_from_an_embedded_one_need_it_named(tmp_path, capsys):
    """A model trained from an embedded model's config keeps its name: without ``--model`` its
    tokens are refused, not decoded by the embedded weights; ``--model image`` decodes them anyway."""
    retrained = Tokenizer.from_pretrained("image")
    with torch.no_grad():
        retrained.decoder.conv_out.bias += 0.1  # trained further, the name kept
    model = retrained.save_pretrained(tmp_path / "retrained")
    photo = small_photos(tmp_path / "p", 1)[0]
    tokens = tmp_path / "t.tvq"
    assert main(["encode", str(photo), "--model", str(model), "-o", str(tokens), "--device", "cpu"]) == 0
    assert load_tokens(tokens)[0]["model_id"] == Tokenizer.from_pretrained("image").config.name
    capsys.readouterr()
    out = tmp_path / "out.png"
    assert main(["decode", str(tokens), "-o", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "with other weights" in err and "--model image" in err and not out.exists()
    assert main(["decode", str(tokens), "--model", "image", "-o", str(out), "--device", "cpu"]) == 0
    assert "with other weights" in capsys.readouterr().err and out.is_file()  # warned, then decoded
    assert main(["decode", str(tokens), "--model", str(model), "-o", str(tmp_path / "own.png"), "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_refused_decode_says_so_once_without_a_warning_first(tmp_path, image_model, capsys):
    tokens = tmp_path / "t.tvq"
    assert main(["encode", *map(str, small_photos(tmp_path / "p", 1)), "--model", str(image_model),
                 "-o", str(tokens)]) == 0
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", "speech", "-o", str(tmp_path / "out.wav")]) == 2
    err = capsys.readouterr().err
    assert "warning" not in err and err.count("tvq: error:") == 1


def test_decoding_one_item_into_a_folder_with_a_dot_in_its_name(tmp_path, image_model):
    """An existing folder, or a name ending in a slash, is a folder even when its name has a
    suffix: the item is written inside it under its source's name."""
    photo = small_photos(tmp_path / "p", 1)[0]
    tokens = tmp_path / "t.tvq"
    assert main(["encode", str(photo), "--model", str(image_model), "-o", str(tokens)]) == 0
    existing = tmp_path / "run.v1"
    existing.mkdir()
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", str(existing)]) == 0
    assert [p.name for p in existing.iterdir()] == [f"{photo.stem}.png"]
    assert main(["decode", str(tokens), "--model", str(image_model), "-o", f"{tmp_path / 'new.v2'}/"]) == 0
    assert [p.name for p in (tmp_path / "new.v2").iterdir()] == [f"{photo.stem}.png"]


def test_a_dash_for_standard_input_or_output_is_refused(tmp_path, image_model, capsys):
    photo = small_photos(tmp_path / "p", 1)[0]
    for argv in (["encode", str(photo), "-o", "-"], ["encode", "-", "-o", str(tmp_path / "t.tvq")],
                 ["decode", "-", "-o", str(tmp_path / "x.png")]):
        capsys.readouterr()
        assert main([*argv, "--model", str(image_model)]) == 2
        assert "'-' (standard input or output) is not supported" in one_error_line(capsys)
    assert not (tmp_path / "-").exists() and not list(tmp_path.glob("*.tvq"))


def test_audio_named_in_bytes_that_are_not_utf8_encodes_and_decodes(tmp_path):
    """Linux file names are bytes; a name that is not UTF-8 reads and writes like any other."""
    import os  # noqa: PLC0415

    model = tiny("audio").save_pretrained(tmp_path / "model")
    src = os.fsdecode(os.fsencode(tmp_path) + b"/take\xff1.wav")
    shutil.copy(sorted(shared_path("audio", "ljspeech").glob("*.wav"))[0], src)
    assert main(["encode", src, "--model", str(model), "-o", str(tmp_path / "t.tvq")]) == 0
    out = os.fsdecode(os.fsencode(tmp_path) + b"/back\xff.wav")
    assert main(["decode", str(tmp_path / "t.tvq"), "--model", str(model), "-o", out]) == 0
    assert sf.info(os.fsencode(out)).samplerate == 16000
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    folder = tmp_path / "decoded"  # the command prints the name it wrote, under a strict UTF-8 locale too
    run = subprocess.run([sys.executable, "-m", "tokenizers_vq.cli", "decode", str(tmp_path / "t.tvq"), "--model",
                          str(model), "-o", f"{folder}/"], capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert b"take\xff1.wav" in run.stdout and os.listdir(os.fsencode(folder)) == [b"take\xff1.wav"]
    tokens = os.fsdecode(os.fsencode(tmp_path) + b"/t\xff.tvq")  # the token file's own name, and the model folder's
    odd_model = os.fsdecode(os.fsencode(tmp_path) + b"/model\xff")
    shutil.copytree(model, odd_model)
    for _ in range(2):  # the second run replaces the token file the first wrote
        assert main(["encode", src, "--model", odd_model, "-o", tokens]) == 0
    assert torch.equal(load_tokens(tokens)[1][0].codes, load_tokens(tmp_path / "t.tvq")[1][0].codes)
    assert main(["decode", tokens, "--model", odd_model, "-o", out]) == 0


def test_a_record_the_file_could_not_give_back_is_refused_before_writing(tmp_path, image_model):
    """An empty item (a stream flushed before any audio) or codes that do not fit their size
    would make a file that no reader opens, its good items lost with it."""
    from tokenizers_vq.tokens import TokenRecord, save_tokens  # noqa: PLC0415

    tok = Tokenizer.from_pretrained(image_model)
    good = TokenRecord(tok.encode(torch.rand(1, 3, 16, 16) * 2 - 1)[0], "a.png", [16, 16])
    path = tmp_path / "t.tvq"
    size = tok.quantizer.codebook_size
    wrapped, past, off, floats = (good.codes.clone().long() for _ in range(4))
    wrapped[0, 0], past[0, 0], off[0, 0] = 2**32 + 7, size, -1  # 2^32 + 7 would be stored as the id 7
    for bad, words in ((TokenRecord(good.codes[:0], "b.png", []), "not positive whole numbers"),
                       (TokenRecord(good.codes, "c.png", [64, 64]), "codes of shape"),
                       (TokenRecord(wrapped, "d.png", [16, 16]), rf"integers in \[0, {size}\) .*ids in \[\d+, {2**32 + 7}\]"),
                       (TokenRecord(past, "e.png", [16, 16]), rf"ids in \[\d+, {size}\] \(a vocabulary's offset"),
                       (TokenRecord(off, "f.png", [16, 16]), r"ids in \[-1, "),
                       (TokenRecord(floats.float() + 0.5, "g.png", [16, 16]), "got torch.float32")):
        with pytest.raises(ValueError, match=words):
            save_tokens(path, tok, [good, bad])
        assert not path.exists()
    save_tokens(path, tok, [good])
    assert torch.equal(load_tokens(path)[1][0].codes, good.codes)


def test_a_token_file_of_no_items_says_so_and_a_pipe_is_named(tmp_path, image_model, capsys):
    """A file of no items (Python's encode_files of an empty list) decodes to nothing, and says so;
    a pipe or a device named as the token file exists, so it is not "not found"."""
    import os  # noqa: PLC0415

    from tokenizers_vq.io import save_safetensors  # noqa: PLC0415
    from tokenizers_vq.token_header import header_sha256  # noqa: PLC0415

    photo = small_photos(tmp_path / "photos", 1)[0]
    assert main(["encode", str(photo), "--model", str(image_model), "-o", str(tmp_path / "t.tvq")]) == 0
    meta, _ = read_raw(tmp_path / "t.tvq")
    meta = {k: v for k, v in meta.items() if k != "header_sha256"}
    meta["items"] = "[]"
    meta["header_sha256"] = header_sha256(meta)
    save_safetensors({}, tmp_path / "empty.tvq", metadata=meta)
    capsys.readouterr()
    assert load_tokens(tmp_path / "empty.tvq")[1] == []
    assert main(["decode", str(tmp_path / "empty.tvq"), "--model", str(image_model), "-o", str(tmp_path / "e.png")]) == 0
    assert capsys.readouterr().out == f"wrote nothing: {tmp_path / 'empty.tvq'} holds no items\n"
    assert not (tmp_path / "e.png").exists()
    os.mkfifo(tmp_path / "f.tvq")
    for path in (tmp_path / "f.tvq", "/dev/zero"):
        assert main(["decode", str(path), "--model", str(image_model), "-o", str(tmp_path / "x.png")]) == 2
        assert f"{path} is not a regular file (a pipe or a device?)" in one_error_line(capsys)


def test_tokens_of_a_model_named_as_an_embedded_one_but_coded_otherwise_ask_for_their_model(tmp_path, capsys):
    """A model trained from a shipped config keeps the embedded model's name: its tokens, of
    another codebook, reach the embedded model when --model is left out, and the refusal
    asks for the model that wrote them (not to leave out the --model already left out)."""
    from tokenizers_vq.tokenizer import QuantizerConfig  # noqa: PLC0415

    mine = tiny("image", QuantizerConfig("vq", {"codebook_size": 16}))
    mine.config.name = Tokenizer.from_pretrained("image").config.name
    folder = mine.save_pretrained(tmp_path / "mine")
    tokens = tmp_path / "t.tvq"
    assert main(["encode", *map(str, small_photos(tmp_path / "p", 1)), "--model", str(folder), "-o", str(tokens)]) == 0
    capsys.readouterr()
    assert main(["decode", str(tokens), "-o", str(tmp_path / "out.png")]) == 2
    err = one_error_line(capsys)
    assert "another model of that name" in err and "pass --model DIR" in err and "leave out --model" not in err
