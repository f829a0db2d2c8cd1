"""WebDataset tar shards as export inputs: real photos and speech packed into a tar here,
read from the path and through a ``pipe:`` URL, never extracted; same tokens as the folder."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from test_tokenizer import tiny
from testdata import shared_path

from tokenizers_vq.cli import main
from tokenizers_vq.export import export_dataset
from tokenizers_vq.webdataset import is_tar_source, list_tar_samples, sample_key


def _pack(tmp_path: Path, files: list[Path], name: str = "shard-000000.tar") -> Path:
    """A WebDataset shard: per sample ``<key>.<ext>`` plus a ``<key>.cls`` label member."""
    tar_path = tmp_path / name
    with tarfile.open(tar_path, "w") as tar:
        for i, f in enumerate(files):
            key = f"samples/{i:06d}"
            tar.add(f, arcname=f"{key}{f.suffix}")
            label = tmp_path / "label.cls"
            label.write_text(str(i))
            tar.add(label, arcname=f"{key}.cls")
    return tar_path


def test_keys_and_sources():
    assert sample_key("a/b/000123.seg.png") == "a/b/000123" and sample_key("x.jpg") == "x"
    assert is_tar_source("data/shard-0001.tar") and is_tar_source("pipe:curl -s http://h/s.tar")
    assert not is_tar_source("photos/")


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_tar_export_equals_the_folder_export_and_keeps_keys(modality, tmp_path):
    if modality == "image":
        files = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:4]
    else:
        files = sorted(shared_path("audio", "librispeech_train-clean-100").glob("*.flac"))[:3]
    tok = tiny(modality)
    tar_path = _pack(tmp_path, files)
    samples = list_tar_samples(tar_path, modality)
    assert [s.key for s in samples] == [f"samples/{i:06d}" for i in range(len(files))]  # .cls members skipped
    folder = export_dataset(tok, files, tmp_path / "folder", shard_items=2, batch_size=2)
    for name, source in (("local", str(tar_path)), ("pipe", f"pipe:cat {tar_path}")):
        out = tmp_path / name
        manifest = export_dataset(tok, list_tar_samples(source, modality), out, shard_items=2, batch_size=2, workers=1)
        assert manifest["num_tokens"] == folder["num_tokens"]
        for shard in manifest["shards"]:
            assert (out / f"{shard}.bin").read_bytes() == (tmp_path / "folder" / f"{shard}.bin").read_bytes()
        keys = [it["info"]["key"] for shard in manifest["shards"]
                for it in json.loads((out / f"{shard}.json").read_text())["items"]]
        assert keys == [s.key for s in samples]
    assert not any(p.suffix in (".jpg", ".flac") for p in tmp_path.rglob("*") if p.parent != tmp_path)  # nothing extracted


def test_tvq_export_reads_a_tar_and_names_a_bad_member(tmp_path, capsys):
    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:3]
    model = tiny("image").save_pretrained(tmp_path / "model")
    tar_path = _pack(tmp_path, photos)
    assert main(["export", "--model", str(model), "--device", "cpu", "--data", f"pipe:cat {tar_path}",
                 "--out", str(tmp_path / "out"), "--shard-items", "2", "--workers", "0"]) == 0
    assert "wrote 2 shards, 3 items" in capsys.readouterr().out
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    bad_tar = _pack(tmp_path, [photos[0], bad], name="bad.tar")
    assert main(["export", "--model", str(model), "--device", "cpu", "--data", str(bad_tar),
                 "--out", str(tmp_path / "bad_out"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{bad_tar}::samples/000001.jpg" in err and "tvq: error" in err
    assert main(["export", "--model", str(model), "--device", "cpu", "--data", "pipe:false",
                 "--out", str(tmp_path / "x")]) == 2
    assert "pipe:false" in capsys.readouterr().err  # an empty or failed stream, said of the source


def test_a_pipe_that_fails_midway_or_talks_a_lot_is_handled(tmp_path):
    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:4]
    tar_path = _pack(tmp_path, photos)
    noisy = f"pipe:sh -c 'head -c 300000 /dev/zero >&2; cat {tar_path}'"  # more than a pipe holds on stderr
    assert [s.key for s in list_tar_samples(noisy, "image")] == [f"samples/{i:06d}" for i in range(4)]
    with tarfile.open(tar_path) as tar:
        cut = tar.getmembers()[4].offset  # the first two samples (jpg + cls each), then the command fails
    dropped = f"pipe:sh -c 'head -c {cut} {tar_path}; exit 3'"
    with pytest.raises(ValueError, match="exited with status 3.*cut short"):
        list_tar_samples(dropped, "image")
