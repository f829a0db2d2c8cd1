"""WebDataset tar shards as export inputs: real photos and speech packed into a tar here,
read from the path and through a ``pipe:`` URL, never extracted; same tokens as the folder."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from test_tokenizer import tiny
from testdata import shared_path

from tokenizers_vq.cli import main
from tokenizers_vq.export import export_dataset
from tokenizers_vq.token_dataset import TokenDataset
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
    assert is_tar_source("W.TAR") and is_tar_source("s.Tar.Gz")  # any case


def test_an_archive_of_another_kind_names_the_shard_names_read(tmp_path):
    from tokenizers_vq.media import list_media  # noqa: PLC0415

    (tmp_path / "w.tar.zst").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"is a file, not a folder.*tar shards are read when named .tar, .tar.gz"):
        list_media(tmp_path / "w.tar.zst", "image")
    (tmp_path / "-w.tar").write_bytes(b"\0" * 10)  # a shard where a folder is read (training, eval): extract it
    with pytest.raises(ValueError, match=r"-w.tar is a file, not a folder: .*\(tvq encode and export read tar shards; "
                                         r"here extract it: mkdir DIR && tar -xf \S*/-w.tar -C DIR\)"):
        list_media(tmp_path / "-w.tar", "image")


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
        assert [it["info"]["key"] for it in TokenDataset(out)] == keys  # a reader joins items to labels by key
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


def test_a_tar_cut_short_at_a_member_is_refused_not_read_as_fewer_samples(tmp_path):
    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:4]
    tar_path = _pack(tmp_path, photos)
    whole = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        last = tar.getmembers()[-2]  # the last sample's photo
    for name, end in (("at_header.tar", last.offset), ("in_header.tar", last.offset + 100),
                      ("in_data.tar", last.offset_data + 1000)):
        (tmp_path / name).write_bytes(whole[:end])
        with pytest.raises(ValueError, match=f"cannot read tar {tmp_path / name}: .*(cut short|end of data)"):
            list_tar_samples(tmp_path / name, "image")
    (tmp_path / "piped.tar").write_bytes(whole[: last.offset])  # a command that exits 0 on a cut archive
    with pytest.raises(ValueError, match="cut short"):
        list_tar_samples(f"pipe:cat {tmp_path / 'piped.tar'}", "image")
    samples = list_tar_samples(tar_path, "image")
    tar_path.write_bytes(whole[: last.offset_data + 1000])  # cut after it was listed: named when loaded
    with pytest.raises(ValueError, match=f"cannot read '{last.name}' of {tar_path}: .*cut short"):
        samples[-1].load("image")


def test_members_of_one_name_are_each_read_as_their_own_sample(tmp_path):
    from tokenizers_vq.media import load_input  # noqa: PLC0415
    from tokenizers_vq.webdataset import close_readers  # noqa: PLC0415

    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:3]
    tar_path = tmp_path / "repeated.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, f in zip(("000000.jpg", "000001.jpg", "000000.jpg"), photos):
            tar.add(f, arcname=name)
    samples = list_tar_samples(tar_path, "image")
    assert [(s.key, s.position) for s in samples] == [("000000", 0), ("000001", 1), ("000000", 2)]
    close_readers()
    for i in (2, 0, 1):  # out of archive order: each by its place, not the next member of its name
        assert torch.equal(samples[i].load("image")[0], load_input(photos[i], "image")[0])


def test_a_failed_pipe_command_is_named_with_its_status_and_message(tmp_path):
    cases = {f"pipe:cat {tmp_path / 'missing.tar'}": "exited with status 1: cat: .*missing.tar",
             "pipe:false": "exited with status 1", "pipe:": "names no command",
             "pipe:no-such-command-here": "status 127: .*no-such-command-here"}
    for source, said in cases.items():
        with pytest.raises(ValueError, match=said):
            list_tar_samples(source, "image")


def test_a_tar_of_another_modality_names_the_model_to_pass(tmp_path, capsys):
    speech = sorted(shared_path("audio", "fsdd").glob("*.wav"))[:2]
    tar_path = _pack(tmp_path, speech)
    assert main(["export", "--device", "cpu", "--data", str(tar_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no image members" in err and "2 audio members" in err and "--model speech" in err


def test_a_pipe_that_writes_no_tar_is_named_as_unreadable_not_by_its_broken_pipe(tmp_path):
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: more than a pipe holds, so cat is still writing
    with pytest.raises(ValueError, match="cannot read tar pipe:cat .*noise.bin") as e:
        list_tar_samples(f"pipe:cat {noise}", "image")
    assert "status" not in str(e.value)


def test_a_sample_codes_its_plain_member_not_a_mask_beside_it(tmp_path):
    """WebDataset writes a sample's members in name order, so ``k.mask.png`` comes before
    ``k.jpg``: the plain field is the one coded, before or after the others."""
    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:2]
    tar_path = tmp_path / "masks.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, f in enumerate(photos):
            for field in ("cls", "mask.jpg", "jpg", "output.jpg"):
                tar.add(f, arcname=f"s/{i:06d}.{field}")
    samples = list_tar_samples(tar_path, "image")
    assert [(s.member, s.key) for s in samples] == [("s/000000.jpg", "s/000000"), ("s/000001.jpg", "s/000001")]


def test_a_tar_of_dotted_file_names_is_refused_not_coded_as_one_sample(tmp_path):
    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:3]
    tar_path = tmp_path / "trip.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, f in enumerate(photos):
            tar.add(f, arcname=f"2023.06.0{i + 1}_trip.jpg")  # one WebDataset key: "2023"
    with pytest.raises(ValueError, match=r"sample '2023' holds 3 image members \(2023.06.01_trip.jpg.*extract the"):
        list_tar_samples(tar_path, "image")


def test_members_of_another_modality_in_a_tar_are_named_as_left_out(tmp_path, capsys):
    photos = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:2]
    speech = sorted(shared_path("audio", "fsdd").glob("*.wav"))[:3]
    tar_path = _pack(tmp_path, [*photos, *speech])
    model = tiny("image").save_pretrained(tmp_path / "model")
    cmd = ["export", "--device", "cpu", "--model", str(model), "--data", str(tar_path), "--out", str(tmp_path / "out")]
    assert main(cmd) == 0
    err = capsys.readouterr().err
    assert "also holds 3 audio members, left out" in err and "--model speech" in err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_items"] == 2


def test_a_pipe_command_runs_in_a_shell_as_webdataset_runs_it(tmp_path):
    """WebDataset's own spellings: a pipeline, and ``|| true`` after a download."""
    tar_path = _pack(tmp_path, sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:2])
    want = [s.member for s in list_tar_samples(tar_path, "image")]
    for source in (f"pipe:cat {tar_path} | cat", f"pipe:cat {tar_path} || true"):
        assert [s.member for s in list_tar_samples(source, "image")] == want
    for source in (f"pipe:cat {tmp_path / 'gone.tar'} | cat", f"pipe:cat {tmp_path / 'gone.tar'} || true"):
        with pytest.raises(ValueError, match="its command said: cat: .*gone.tar: No such file"):  # status 0
            list_tar_samples(source, "image")


def test_a_member_named_longer_than_a_file_name_may_be_is_read(tmp_path):
    photo = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[0]
    tar_path = tmp_path / "long.tar"
    name = "k" * 300 + ".jpg"  # a tar keeps long names (PAX headers); a file system does not
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(photo, arcname=name)
    from tokenizers_vq.media import load_input  # noqa: PLC0415

    (sample,) = list_tar_samples(tar_path, "image")
    assert sample.member == name and torch.equal(sample.load("image")[0], load_input(photo, "image")[0])


def test_a_pipe_command_does_not_read_tvq_s_own_input():
    """``pipe:cat`` with tvq's standard input held open (a terminal, a pipe from another
    command): the command reads nothing, and the empty stream is named, not waited on."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    script = "from tokenizers_vq.webdataset import list_tar_samples; list_tar_samples('pipe:cat', 'image')"
    read, write = os.pipe()  # the write end stays open: a command reading it would wait for ever
    try:
        done = subprocess.run([sys.executable, "-c", script], stdin=read, capture_output=True, text=True, timeout=120)
    finally:
        os.close(read)
        os.close(write)
    assert done.returncode != 0 and "pipe:cat" in done.stderr and "empty" in done.stderr
