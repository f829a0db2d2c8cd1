"""What an export does to the folder it writes into: another tool's files are never
replaced, an ``--overwrite`` that fails leaves the earlier export as it was, and a folder
that is a file, or an index with fields of the wrong kind, is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tokenizer import tiny
from testdata import interrupt_at_call, small_photos

from tokenizers_vq import export_record
from tokenizers_vq.cli import main
from tokenizers_vq.export import TokenDataset, export_dataset


def _cmd(tmp_path: Path, out: Path) -> list[str]:
    model = tmp_path / "model"
    if not model.is_dir():
        tiny("image").save_pretrained(model)
        small_photos(tmp_path / "photos", 3, side=32)
    return ["export", "--model", str(model), "--data", str(tmp_path / "photos"), "--out", str(out), "--device", "cpu"]


@pytest.mark.parametrize("theirs", ['{"audio_filepath": "a.wav", "text": "hello"}\n',  # NeMo's, one line
                                    '{"a": 1}\n{"b": 2}\n', '// made by another tool\n{"files": []}\n'])  # not JSON
@pytest.mark.parametrize("name", ["manifest.json", "export.json"])
def test_another_tools_manifest_is_kept_and_the_export_refused_even_with_overwrite(tmp_path, capsys, name, theirs):
    out = tmp_path / "nemo"
    out.mkdir()
    (out / name).write_text(theirs)
    for extra in ([], ["--overwrite"]):
        assert main([*_cmd(tmp_path, out), *extra]) == 2
        err = capsys.readouterr().err
        assert f"holds {name} that no export wrote" in err and "another folder (--out)" in err
        assert (out / name).read_text() == theirs and sorted(p.name for p in out.iterdir()) == [name]


def test_a_record_cut_short_beside_only_a_temporary_is_the_exports_own(tmp_path, capsys):
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "export.json").write_text('{"format": "tvq-sh')  # a crash before the first shard was renamed
    assert main([*_cmd(tmp_path, out), "--overwrite"]) == 2  # alone: not known to be an export's
    assert "delete them if they are what remains of an export cut short" in capsys.readouterr().err
    (out / ".shard_00000.tvq-tmp-a1b2c3d4.bin").write_bytes(b"\0" * 6)
    assert main([*_cmd(tmp_path, out), "--overwrite"]) == 0
    assert len(TokenDataset(out)) == 3


def test_hidden_files_named_like_an_exports_temporaries_are_kept(tmp_path):
    out = tmp_path / "tokens"
    assert main([*_cmd(tmp_path, out), "--shard-items", "2"]) == 0
    mine = {".export.20240601.json": "{}", ".manifest.original.json": "[1]", ".shard_00000.backup01.bin": "x"}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert main(_cmd(tmp_path, out)) == 2  # another shard size: refused
    assert main([*_cmd(tmp_path, out), "--shard-items", "2"]) == 0  # the same: a finished export, resumed
    assert main([*_cmd(tmp_path, out), "--overwrite"]) == 0
    assert {name: (out / name).read_text() for name in mine} == mine and len(TokenDataset(out)) == 3


def test_an_overwrite_whose_record_cannot_be_written_leaves_the_earlier_export(tmp_path, monkeypatch):
    out = tmp_path / "tokens"
    assert main([*_cmd(tmp_path, out), "--shard-items", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = export_record.atomic_write

    def full_disk(path, write):
        if Path(path).name == export_record.RECORD:
            raise OSError(28, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(export_record, "atomic_write", full_disk)
    assert main([*_cmd(tmp_path, out), "--shard-items", "1", "--overwrite"]) != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing set aside, nothing lost
    assert len(TokenDataset(out)) == 3


def test_an_interrupted_overwrite_run_again_resumes_its_shards(tmp_path, monkeypatch):
    import tokenizers_vq.export as export_module  # noqa: PLC0415

    tok, photos, out = tiny("image"), small_photos(tmp_path / "photos", 3, side=32), tmp_path / "tokens"
    export_dataset(tok, photos, out, shard_items=2)
    real = export_module._encode_shard
    calls = interrupt_at_call(monkeypatch, export_module, "_encode_shard", 2)
    with pytest.raises(KeyboardInterrupt):
        export_dataset(tok, photos, out, shard_items=1, overwrite=True)
    first = (out / "shard_00000.bin").read_bytes()
    assert (out / export_record.REPLACED).is_dir()  # the earlier export, kept until this one is finished
    calls.clear()
    monkeypatch.setattr(export_module, "_encode_shard", lambda *a: calls.append(1) or real(*a))
    export_dataset(tok, photos, out, shard_items=1, overwrite=True)
    assert len(calls) == 2 and (out / "shard_00000.bin").read_bytes() == first  # the finished shard was kept
    assert not (out / export_record.REPLACED).exists() and len(TokenDataset(out)) == 3


def test_the_earlier_command_after_an_interrupted_overwrite_puts_its_export_back(tmp_path, monkeypatch, capsys):
    """Ctrl-C in an --overwrite export says where the export it replaces is; the command that
    made that export, run again without --overwrite, puts it back finished (nothing encoded)
    instead of refusing the folder."""
    import tokenizers_vq.export as export_module  # noqa: PLC0415

    out = tmp_path / "tokens"
    first = _cmd(tmp_path, out) + ["--shard-items", "2"]
    assert main(first) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    interrupt_at_call(monkeypatch, export_module, "_encode_shard", 2)
    assert main(_cmd(tmp_path, out) + ["--shard-items", "1", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert f"tvq: interrupted (the export this one replaces is kept in {out / export_record.REPLACED}" in err
    assert not (out / "manifest.json").exists()  # the replacement is unfinished
    monkeypatch.setattr(export_module, "_encode_shard", lambda *a: pytest.fail("the earlier export is whole"))
    assert main(first) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (out / export_record.REPLACED).exists() and len(TokenDataset(out)) == 3


def test_an_earlier_export_recorded_by_an_older_reader_is_put_back_and_its_record_upgraded(tmp_path, monkeypatch):
    import tokenizers_vq.export as export_module  # noqa: PLC0415

    out = tmp_path / "tokens"
    first = _cmd(tmp_path, out) + ["--shard-items", "2"]
    assert main(first) == 0
    record = out / "export.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "image_reader": "upright"}))  # colours as stored
    interrupt_at_call(monkeypatch, export_module, "_encode_shard", 2)
    assert main(_cmd(tmp_path, out) + ["--shard-items", "1", "--overwrite"]) == 130
    monkeypatch.setattr(export_module, "_encode_shard", lambda *a: pytest.fail("the earlier export is whole"))
    assert main(first) == 0  # no photo reads otherwise in sRGB: the earlier export resumes as finished
    assert json.loads(record.read_text())["image_reader"] == "upright, srgb, palettes" and len(TokenDataset(out)) == 3


def test_an_interrupted_overwrite_of_an_unfinished_export_says_only_to_run_it_again(tmp_path, monkeypatch, capsys):
    import tokenizers_vq.export as export_module  # noqa: PLC0415

    out = tmp_path / "tokens"
    first = _cmd(tmp_path, out) + ["--shard-items", "1"]
    interrupt_at_call(monkeypatch, export_module, "_encode_shard", 2)
    assert main(first) == 130  # unfinished: no manifest
    interrupt_at_call(monkeypatch, export_module, "_encode_shard", 2)
    assert main(_cmd(tmp_path, out) + ["--shard-items", "2", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "the unfinished export this one replaces is kept in" in err and "the earlier one" not in err


def test_an_interrupt_without_a_message_says_what_it_leaves(tmp_path, monkeypatch, capsys):
    import tokenizers_vq.export as export_module  # noqa: PLC0415

    interrupt_at_call(monkeypatch, export_module, "_encode_shard", 1)
    assert main(_cmd(tmp_path, tmp_path / "tokens")) == 130
    assert "tvq: interrupted (files already written are complete; an export resumes when run again)" in \
        capsys.readouterr().err


def test_an_out_that_is_a_file_is_named(tmp_path, capsys):
    out = tmp_path / "tokens"
    out.write_text("mine")
    assert main(_cmd(tmp_path, out)) == 2
    err = capsys.readouterr().err
    assert f"{out} is a file: an export is written into a folder" in err and out.read_text() == "mine"


@pytest.mark.parametrize(("edit", "said"), [
    (lambda m: m.pop("num_tokens"), "it lacks num_tokens"),
    (lambda m: m.update(codebook_size="32"), "codebook_size must be whole numbers"),
    (lambda m: m.update(items_per_shard=3), "items_per_shard must be whole numbers"),
])
def test_a_manifest_with_a_missing_or_mistyped_count_is_named(tmp_path, edit, said):
    out = tmp_path / "tokens"
    export_dataset(tiny("image"), small_photos(tmp_path / "photos", 3, side=32), out, shard_items=2)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"corrupt {out / 'manifest.json'}: {said}"):
        TokenDataset(out)


@pytest.mark.parametrize(("edit", "said"), [
    (lambda it: it.pop("offset"), "item 1 has no valid offset"),
    (lambda it: it.update(shape=[str(n) for n in it["shape"]]), "item 1 has no valid shape"),
    (lambda it: it.update(length=None), "item 1 has no valid length"),
])
def test_an_index_with_a_missing_or_mistyped_field_is_named_on_resume(tmp_path, capsys, edit, said):
    out = tmp_path / "tokens"
    assert main([*_cmd(tmp_path, out), "--shard-items", "2"]) == 0
    index = json.loads((out / "shard_00000.json").read_text())
    edit(index["items"][1])
    (out / "shard_00000.json").write_text(json.dumps(index))
    (out / "manifest.json").unlink()  # an export killed before its manifest: the rerun checks every shard
    assert main([*_cmd(tmp_path, out), "--shard-items", "2"]) == 2
    err = capsys.readouterr().err
    assert f"corrupt {out / 'shard_00000.json'}: {said}" in err and "shard_00000.* to have that shard encoded" in err
    assert "Traceback" not in err


def test_decoding_an_export_folder_points_to_its_reader(tmp_path, capsys):
    out = tmp_path / "tokens"
    assert main(_cmd(tmp_path, out)) == 0
    assert main(["decode", str(out), "-o", str(tmp_path / "x.png")]) == 2
    assert "an export's shards: read them with tokenizers_vq.export.TokenDataset" in capsys.readouterr().err


def test_an_export_record_damaged_by_a_cut_write_is_corrupt_and_overwrite_repairs_it(tmp_path, capsys):
    out = tmp_path / "tokens"
    assert main(_cmd(tmp_path, out)) == 0
    (out / "export.json").write_bytes(b"")  # a rename that reached the disk before the data did
    assert main(_cmd(tmp_path, out)) == 2
    assert f"corrupt {out / 'export.json'}" in (err := capsys.readouterr().err) and "--overwrite" in err
    assert main([*_cmd(tmp_path, out), "--overwrite"]) == 0 and len(TokenDataset(out)) == 3


def test_an_export_recorded_with_the_full_state_weights_hash_resumes_as_the_same_model(tmp_path, monkeypatch):
    """Exports written when the weights hash covered a VQ's EMA sums too name the same weights:
    the rerun resumes (nothing encoded) and the record takes this version's hash."""
    import tokenizers_vq.export as export_module  # noqa: PLC0415

    from tokenizers_vq.export_record import weights_sha256  # noqa: PLC0415

    tok, photos, out = tiny("image"), small_photos(tmp_path / "photos", 3, side=32), tmp_path / "tokens"
    export_dataset(tok, photos, out, shard_items=2)
    record = out / "export.json"
    now = json.loads(record.read_text())
    assert now["weights_sha256"] == weights_sha256(tok) != weights_sha256(tok, full=True)
    record.write_text(json.dumps({**now, "weights_sha256": weights_sha256(tok, full=True)}))
    monkeypatch.setattr(export_module, "_encode_shard", lambda *a: pytest.fail("the export is whole"))
    export_dataset(tok, photos, out, shard_items=2)
    assert json.loads(record.read_text())["weights_sha256"] == weights_sha256(tok)
    other = tiny("image")
    with torch.no_grad():
        next(other.decoder.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="weights_sha256"):  # other weights: named among the differences
        export_dataset(other, photos, out, shard_items=2)


def test_the_pictures_of_reports_runs_and_priors_inside_the_data_are_not_exported(tmp_path):
    from tokenizers_vq.media import REPORT_FILES, save_image  # noqa: PLC0415

    model = tiny("image").save_pretrained(tmp_path / "model")
    photos = small_photos(tmp_path / "data", 2, side=32)
    marks = {"report": REPORT_FILES, "run": {"metrics.jsonl"}, "prior": {"prior_config.json", "prior.safetensors"}}
    for folder, names in marks.items():
        (tmp_path / "data" / folder).mkdir()
        for name in names - {"codebook_usage.png"}:
            (tmp_path / "data" / folder / name).write_text("{}")
        save_image(torch.rand(3, 32, 32), tmp_path / "data" / folder / "codebook_usage.png")  # a picture a tool wrote
    assert main(["export", "--model", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "tokens"),
                 "--device", "cpu"]) == 0
    tokens = TokenDataset(tmp_path / "tokens")
    sources = sorted(Path(tokens[i]["source"]).name for i in range(len(tokens)))
    assert sources == sorted(p.name for p in photos)
