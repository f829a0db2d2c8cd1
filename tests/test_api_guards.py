"""The Python API refuses what it cannot code faithfully, with the fix in the message: sizes
that do not fit the codes, codes without their batch axis; it takes any float dtype."""

from __future__ import annotations

import math

import pytest
import torch
from test_tokenizer import TINY, tiny


@pytest.mark.parametrize("modality,size", [("image", (30, 41)), ("audio", (1001,)), ("video", (7, 16, 24))])
def test_decode_crops_to_a_size_that_fits_and_refuses_one_that_does_not(modality, size):
    tok = tiny(modality)
    x = torch.rand(1, 1 if modality == "audio" else 3, *size) * 2 - 1
    codes = tok.encode(x)
    assert tok.decode(codes, size=size).shape == x.shape
    wrong_axes = size[:-1] if len(size) > 1 else (*size, 5)
    bigger = tuple(4 * s for s in size)
    for bad, said in ((wrong_axes, "is sized"), ((0, *size[1:]), "whole number >= 1"),
                      ((-1, *size[1:]), "whole number >= 1"), (bigger, "do not fit size")):
        with pytest.raises(ValueError, match=said):
            tok.decode(codes, size=bad)
    with pytest.raises(ValueError, match="is sized"):
        tok.grid_shape(wrong_axes)


def test_codes_without_their_batch_axis_are_named_with_the_fix():
    tok = tiny("audio")
    codes = tok.encode(torch.rand(1, 1, 2000) * 0.2 - 0.1)
    with pytest.raises(ValueError, match=r"expected \(B, \*grid, \*code_shape\).*codes\[None\]"):
        tok.decode(codes[0])
    assert torch.equal(tok.decode(codes[0][None]), tok.decode(codes))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_any_float_input_is_coded_in_the_weights_dtype(dtype):
    tok = tiny("image")
    x = (torch.rand(2, 3, 24, 32) * 2 - 1).to(dtype)  # compared with the same values in float32
    assert torch.equal(tok.encode(x), tok.encode(x.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts only fp32 and its own dtype: the rest go as fp32
        assert torch.equal(tok.encode(x), tok.encode(x.float()))


def test_packed_codes_refuse_a_size_they_do_not_fit():
    from test_tokenizer import tiny_dynamic  # noqa: PLC0415

    tok = tiny_dynamic("image")
    x = torch.rand(1, 3, 30, 41) * 2 - 1
    packed = tok.encode(x)
    assert tok.decode(packed, size=(30, 41)).shape == x.shape
    for size in ((500, 500), (8, 8)):
        with pytest.raises(ValueError, match=r"codes of grid \[\d+, \d+\] do not fit size .*pass the size the media had"):
            tok.decode(packed, size=size)


def test_integer_pixels_are_refused_with_the_scaling_to_use():
    tok = tiny("image")
    with pytest.raises(ValueError, match=r"x / 127.5 - 1"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_a_config_edited_under_weights_that_still_fit_is_refused(tmp_path):
    import json  # noqa: PLC0415

    from tokenizers_vq import QuantizerConfig, Tokenizer, TokenizerConfig  # noqa: PLC0415

    tok = Tokenizer(TokenizerConfig("image", TINY["image"], QuantizerConfig("fsq", {"levels": [8, 5, 5, 5]})))
    folder = tok.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["name"], config["chunk_frames"] = "renamed", 100  # settings that do not change what the weights compute
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    assert Tokenizer.from_pretrained(folder).config.name == "renamed"
    config["quantizer"]["options"]["levels"] = [5, 5, 5, 8]  # the same shapes, other codes
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json was edited since .*model.safetensors was saved with it"):
        Tokenizer.from_pretrained(folder)


def test_a_config_with_defaults_written_out_or_left_out_still_loads(tmp_path):
    import json  # noqa: PLC0415

    from tokenizers_vq import QuantizerConfig, Tokenizer, TokenizerConfig  # noqa: PLC0415
    from tokenizers_vq.backbones import ImageBackboneConfig  # noqa: PLC0415

    backbone = {**TINY["image"], "attention": ImageBackboneConfig.attention}
    tok = Tokenizer(TokenizerConfig("image", backbone, QuantizerConfig("vq", {"codebook_size": 64, "metric": "l2"})))
    folder = tok.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["backbone"]["attention"], config["quantizer"]["options"]["metric"]  # both their defaults
    config["backbone"]["in_channels"] = ImageBackboneConfig.in_channels
    config["quantizer"]["options"]["decay"] = 0.99
    config["quantizer"]["beam_size"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    again = Tokenizer.from_pretrained(folder)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(again.encode(x), tok.eval().encode(x))
    config["quantizer"]["options"]["decay"] = 0.9  # a default changed is an edit
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json was edited since"):
        Tokenizer.from_pretrained(folder)


def test_the_architecture_hash_tells_quantizer_kinds_and_a_dynamic_wrapper_apart(tmp_path):
    import json  # noqa: PLC0415

    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    from tokenizers_vq import QuantizerConfig, Tokenizer, TokenizerConfig  # noqa: PLC0415
    from tokenizers_vq.tokenizer_config import architecture_sha256  # noqa: PLC0415

    configs = [TokenizerConfig("image", TINY["image"], QuantizerConfig(kind, {"codebook_size": 64}, dynamic=dynamic))
               for kind, dynamic in (("vq", None), ("simvq", None), ("ibq", None), ("vq", {}))]
    assert len({architecture_sha256(c) for c in configs}) == 4
    folder = Tokenizer(configs[0]).save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    assert meta["architecture_sha256"] == architecture_sha256(configs[0], written=True)  # (what other readers check)
    assert meta["architecture_sha256_nondefault"] == architecture_sha256(configs[0])
    del meta["architecture_sha256_nondefault"]  # a file with the written form alone is checked against it
    save_file(load_file(weights), weights, metadata=meta)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config, indent=1))  # the same settings, spaced otherwise
    Tokenizer.from_pretrained(folder)
    config["quantizer"]["options"]["metric"] = "cosine"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json was edited since"):
        Tokenizer.from_pretrained(folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU loads onto it")
def test_loading_onto_a_gpu_the_machine_lacks_is_named():
    from tokenizers_vq import Tokenizer  # noqa: PLC0415

    with pytest.raises(ValueError, match="map_location='cuda': torch sees no CUDA GPU"):
        Tokenizer.from_pretrained("image", map_location="cuda")


def test_map_location_takes_a_device_and_names_one_it_cannot_load_on():
    from tokenizers_vq import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_pretrained("image", map_location=torch.device("cpu"))
    assert next(tok.parameters()).device == torch.device("cpu")
    for bad, said in (("gpu", "not a device name torch knows"), ("meta", "load with 'cpu' or 'cuda'"),
                      (3.5, "not a device name torch knows")):
        with pytest.raises(ValueError, match=f"map_location={bad!r}: {said}"):
            Tokenizer.from_pretrained("image", map_location=bad)


def test_unsigned_codes_as_shards_hold_them_decode_as_any_integer_codes():
    tok = tiny("image").eval()
    codes = tok.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    want = tok.decode(codes)
    for dtype in (torch.uint16, torch.uint32):
        assert torch.equal(tok.decode(codes.to(dtype)), want)


def test_coding_settings_are_checked_where_the_config_is_made(tmp_path):
    import json  # noqa: PLC0415

    from tokenizers_vq import Tokenizer, TokenizerConfig  # noqa: PLC0415
    from tokenizers_vq.tokenizer import PRETRAINED  # noqa: PLC0415

    for field, value in (("chunk_frames", 0), ("chunk_frames", "500"), ("chunk_context", -10), ("clip_frames", 1.5)):
        with pytest.raises(ValueError, match=f"{field} must be a whole number"):
            TokenizerConfig("audio", **{field: value})
    folder = tmp_path / "video16"  # a video model's clips are 1 + 4k frames: 16 would be padded, then cut short
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((PRETRAINED["video"] / "model.safetensors").read_bytes())
    config = json.loads((PRETRAINED["video"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "clip_frames": 16}))
    with pytest.raises(ValueError, match=r"clip_frames=16: a video model with 4x temporal compression .* use e\.g\. 13"):
        Tokenizer.from_pretrained(folder)


def test_an_audio_size_may_be_a_bare_number_and_a_dtype_given_as_text_is_named(tmp_path):
    tok = tiny("audio").eval()
    codes = tok.encode(torch.zeros(1, 1, 800))
    assert torch.equal(tok.decode(codes, size=800), tok.decode(codes, size=(800,)))  # as a stream's flush takes it
    with pytest.raises(ValueError, match=r"size 80.5: an audio is sized \(T,\)"):
        tok.decode(codes, size=80.5)
    with pytest.raises(ValueError, match=r"size 64: an image is sized \(H, W\)"):
        tiny("image").decode(tiny("image").encode(torch.zeros(1, 3, 64, 64)), size=64)
    with pytest.raises(ValueError, match="floating-point torch dtype .*'float16'"):
        tok.save_pretrained(tmp_path / "m", dtype="float16")


def test_the_video_token_rate_counts_each_clips_first_frame():
    from tokenizers_vq import Tokenizer  # noqa: PLC0415

    video = Tokenizer.from_pretrained("video")
    grid = video.grid_shape((17, 64, 64))  # one clip: 5 latent frames of 8 x 8
    assert video.tokens_per_unit() == pytest.approx(math.prod(grid) / (17 * 64 * 64))


def test_a_save_that_fails_halfway_leaves_the_model_saved_there_before(tmp_path, monkeypatch):
    """A full disk while the config is written: the weights saved there before stay, with
    their own config, and no temporary file is left behind."""
    import errno  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from tokenizers_vq import QuantizerConfig, Tokenizer  # noqa: PLC0415

    first = tiny("image")
    folder = first.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = tiny("image", QuantizerConfig("vq", {"codebook_size": 64}))

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match=r"config\.json"):
        other.save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    import os  # noqa: PLC0415

    renames, real = [], os.replace

    def second_rename_refused(src, dst):  # e.g. config.json held open elsewhere
        renames.append(dst)
        if len(renames) == 2:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_refused)
    with pytest.raises(OSError, match="Permission denied"):
        other.save_pretrained(folder)
    monkeypatch.undo()
    assert len(renames) >= 2 and {p.name: p.read_bytes() for p in folder.iterdir()} == before
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(Tokenizer.from_pretrained(folder).encode(x), first.encode(x))


def test_an_interrupt_just_after_a_rename_and_a_backup_left_behind_keep_the_model_whole(tmp_path, monkeypatch):
    """Ctrl-C landing after the first rename but before its book-keeping puts the earlier file
    back (deleting the backup instead would leave new weights beside the old config); a backup
    that cannot be removed once both files are in place does not fail the save; a file written
    alone and interrupted just after its rename is the new file (nothing to put back)."""
    import os  # noqa: PLC0415

    from tokenizers_vq import QuantizerConfig, Tokenizer  # noqa: PLC0415

    first = tiny("image")
    folder = first.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = tiny("image", QuantizerConfig("vq", {"codebook_size": 64}))
    real_replace, real_unlink = os.replace, os.unlink

    def interrupted_after(src, dst):
        real_replace(src, dst)
        if not str(src).endswith(".kept"):  # (the restore renames back: let it)
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(Tokenizer.from_pretrained(folder).encode(x), first.encode(x))

    def backups_stay(path, *args, **kwargs):
        if str(path).endswith(".kept"):
            raise PermissionError("held open elsewhere")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", backups_stay)
    other.save_pretrained(folder)
    monkeypatch.undo()
    assert torch.equal(Tokenizer.from_pretrained(folder).encode(x), other.encode(x))
    from tokenizers_vq.io import atomic_write  # noqa: PLC0415

    alone = tmp_path / "alone.txt"
    alone.write_text("old")
    monkeypatch.setattr(os, "replace", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(alone, lambda tmp: open(tmp, "w").write("new"))
    monkeypatch.undo()
    assert alone.read_text() == "new"


def test_a_model_with_a_compiled_part_saves_under_its_own_names_and_tilde_is_home(tmp_path, monkeypatch):
    from tokenizers_vq import Tokenizer  # noqa: PLC0415

    model = tiny("image")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    want = model.encode(x)
    model.encoder = torch.compile(model.encoder)  # as streaming and carry expect a user may do
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # (where a folder named "~" would be made)
    folder = model.save_pretrained("~/compiled")
    assert folder == tmp_path / "home" / "compiled" and (folder / "config.json").is_file()
    assert torch.equal(Tokenizer.from_pretrained("~/compiled").encode(x), want)


@pytest.mark.parametrize("given", ["tensor", "file"])
def test_a_projected_codebook_saves_its_features_in_the_weights_alone(given, tmp_path):
    """Features given as a tensor (JSON cannot hold it) or as a file (gone where the model is
    loaded) are kept in model.safetensors; config.json records their shape."""
    import json  # noqa: PLC0415

    from safetensors.torch import save_file  # noqa: PLC0415

    from tokenizers_vq import QuantizerConfig, Tokenizer  # noqa: PLC0415

    feats = torch.randn(48, 6, generator=torch.Generator().manual_seed(3))
    source = feats
    if given == "file":
        source = str(tmp_path / "features.safetensors")
        save_file({"f": feats}, source)
    tok = tiny("image", QuantizerConfig("projected_vq", {"codebook_size": 32, "features": source, "kmeans_iters": 2}))
    folder = tok.save_pretrained(tmp_path / "m")
    from tokenizers_vq.train.warm_start import warm_start  # noqa: PLC0415

    fresh = tiny("image", QuantizerConfig("projected_vq", {"codebook_size": 32, "features": source, "kmeans_iters": 2}))
    warm_start(fresh, str(folder))  # a run of the same model section starts from the saved one
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(fresh.encode(x), tok.encode(x))
    if given == "file":
        (tmp_path / "features.safetensors").unlink()
    assert json.loads((folder / "config.json").read_text())["quantizer"]["options"]["features"] == {"in_weights": [32, 6]}
    loaded = Tokenizer.from_pretrained(folder)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert torch.equal(loaded.quantizer.features, tok.quantizer.features)
    loaded.save_pretrained(tmp_path / "again")  # saved again from the marker
    assert torch.equal(Tokenizer.from_pretrained(tmp_path / "again").encode(x), tok.encode(x))


def test_quantizer_wrapper_settings_are_checked_where_the_config_is_made():
    from tokenizers_vq import QuantizerConfig  # noqa: PLC0415

    for field, value in (("groups", 0), ("levels", 0), ("levels", 2.0), ("beam_size", True)):
        with pytest.raises(ValueError, match=f"quantizer.{field} must be a whole number >= 1"):
            QuantizerConfig("vq", {"codebook_size": 32}, **{field: value})
    for value in (-0.1, 7.0, "0.5"):
        with pytest.raises(ValueError, match="quantizer.dropout must be a number in"):
            QuantizerConfig("vq", {"codebook_size": 32}, levels=2, dropout=value)
    with pytest.warns(UserWarning, match=r"dropout=0.5 drops residual levels, and there is one .* no effect"):
        QuantizerConfig("vq", {"codebook_size": 32}, groups=2, dropout=0.5)
    assert QuantizerConfig("vq", {"codebook_size": 32}, levels=2, dropout=0.5).build(8).dropout == 0.5


def test_a_model_saved_with_dropout_on_one_level_still_loads(tmp_path):
    from tokenizers_vq import QuantizerConfig, Tokenizer  # noqa: PLC0415

    with pytest.warns(UserWarning, match="no effect"):
        tok = tiny("image", QuantizerConfig("vq", {"codebook_size": 32}, dropout=0.1))
    with pytest.warns(UserWarning, match="no effect"):
        again = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "m"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(again.encode(x), tok.encode(x))


def test_an_empty_folder_name_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch):
    from tokenizers_vq import Tokenizer  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("mine")
    from tokenizers_vq.prior import PriorConfig, TokenPrior  # noqa: PLC0415
    from tokenizers_vq.export import export_dataset  # noqa: PLC0415

    prior = TokenPrior(PriorConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=8))
    for call in (lambda: tiny("image").save_pretrained(""), lambda: Tokenizer.from_pretrained(""),
                 lambda: prior.save(""), lambda: TokenPrior.load(""), lambda: export_dataset(tiny("image"), [], "")):
        with pytest.raises(ValueError, match="an empty file name"):
            call()
    assert (tmp_path / "config.json").read_text() == "mine"


def test_codes_that_are_not_a_tensor_are_named_with_the_fix():
    tok = tiny("image").eval()
    codes = tok.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    for given in (codes.tolist(), codes.numpy()):
        with pytest.raises(ValueError, match=r"a torch.Tensor of codes \(torch.as_tensor"):
            tok.decode(given)
