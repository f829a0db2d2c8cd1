"""The export's reader and precision: one loader for all the shards a rank writes, batches
that never cross a shard, inputs handed over in runs (a failed read stops at its own file),
and ``precision`` recorded so that a resume keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tokenizer import tiny
from testdata import shared_path

from tokenizers_vq import Tokenizer, export, export_pipeline
from tokenizers_vq.export import export_dataset


def photos(n: int) -> list[Path]:
    return sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:n]


def test_one_reader_feeds_every_shard_and_batches_stay_inside_a_shard(tmp_path, monkeypatch):
    """The loader is started once per export (not once per shard), and a batch never
    mixes two shards' files, so a resumed export (which starts at an unfinished shard)
    batches every shard as the uninterrupted one did."""

    reads, batches, real_read, real_batches = [], [], export.read_inputs, export.encode_batches

    def read(tok, files, workers, batch_size=1, fit=None):
        reads.append(len(files))
        return real_read(tok, files, workers, batch_size, fit)

    def encode_batches(tok, items, batch_size, precision="fp32"):
        for chunk, codes in real_batches(tok, items, batch_size, precision):
            batches.append([f.name for f, _, _ in chunk])
            yield chunk, codes

    monkeypatch.setattr(export, "read_inputs", read)
    monkeypatch.setattr(export, "encode_batches", encode_batches)
    files = photos(7)
    tok = tiny("image")
    export_dataset(tok, files, tmp_path / "a", shard_items=3, batch_size=4, workers=1)
    assert reads == [7]
    shard_of = {f.name: i // 3 for i, f in enumerate(files)}
    assert all(len({shard_of[n] for n in b}) == 1 for b in batches) and sum(map(len, batches)) == 7
    for name in ("shard_00001.bin", "shard_00001.json"):  # resume: only the unfinished shard is read
        (tmp_path / "a" / name).unlink()
    (tmp_path / "a" / "manifest.json").unlink()
    reads.clear()
    export_dataset(tok, files, tmp_path / "a", shard_items=3, batch_size=4, workers=1)
    assert reads == [3]


def test_bf16_precision_is_recorded_and_a_resume_must_keep_it(tmp_path):
    files = photos(3)
    tok = tiny("image")
    export_dataset(tok, files, tmp_path / "x", shard_items=2, precision="bf16")
    assert json.loads((tmp_path / "x" / "export.json").read_text())["precision"] == "bf16"
    with pytest.raises(ValueError, match='precision: "bf16" vs "fp32" \\(the default\\)'):
        export_dataset(tok, files, tmp_path / "x", shard_items=2)
    with pytest.raises(ValueError, match="precision='fp16'"):
        export_dataset(tok, files, tmp_path / "y", precision="fp16")
    fp32 = export_dataset(tok, files, tmp_path / "z", shard_items=2)
    assert "precision" not in json.loads((tmp_path / "z" / "export.json").read_text())
    assert fp32["num_items"] == 3
    with pytest.raises(ValueError, match='precision: "fp32" \\(the default\\) vs "bf16"'):
        export_dataset(tok, files, tmp_path / "z", shard_items=2, precision="bf16")


@pytest.mark.parametrize(("name", "shape"), [("image", (2, 3, 32, 48)), ("speech", (2, 1, 9600)),
                                           ("video", (1, 3, 5, 32, 32))])
def test_bf16_export_casts_the_encoder_weights_once_with_the_same_codes(name, shape):
    """The bf16 export encodes with conv and linear weights cast once (:func:`autocast_weights`),
    not on every call: latents and codes equal those of the shipped model under bf16 autocast
    bit for bit (casting its norms' weights too would not), and the tokenizer given keeps its
    fp32 weights."""
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(name).eval()
    x = torch.rand(shape) * 2 - 1
    cast = export_pipeline.autocast_weights(tok, torch.bfloat16)
    convs = [m for m in cast.encoder.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(p.dtype == torch.float32 for p in tok.parameters())
    assert cast.quantizer is tok.quantizer and cast.decoder is tok.decoder
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cast.encoder(x), tok.encoder(x))
        assert torch.equal(cast.encode(x), tok.encode(x))


def test_an_export_recorded_before_new_config_fields_still_resumes(tmp_path):
    """A record whose model config lacks fields added later (they read as their defaults)
    resumes; a real difference is still refused."""
    files = photos(3)
    tok = tiny("image")
    export_dataset(tok, files, tmp_path / "x", shard_items=2)
    record = json.loads((tmp_path / "x" / "export.json").read_text())
    for key in ("shared_codebook", "beam_size"):
        del record["model_config"]["quantizer"][key]
    (tmp_path / "x" / "export.json").write_text(json.dumps(record))
    for name in ("shard_00001.bin", "shard_00001.json", "manifest.json"):
        (tmp_path / "x" / name).unlink()
    assert export_dataset(tok, files, tmp_path / "x", shard_items=2)["num_items"] == 3
    record["model_config"]["quantizer"]["beam_size"] = 2
    (tmp_path / "x" / "export.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="beam_size"):
        export_dataset(tok, files, tmp_path / "x", shard_items=2)


def test_inputs_handed_over_in_runs_come_out_in_their_own_memory():
    """Loader workers send runs of inputs in one buffer; each input leaves the run in its own
    memory (a photo waiting for a batch must not keep its run's other photos alive), equal
    to reading it alone, in file order."""
    files = sorted(shared_path("images", "bsds500", "val").glob("*.jpg"))[:5]
    Chunks = export_pipeline._Chunks
    inputs = export_pipeline._Inputs(files, "image", None)
    out = [*Chunks.unpack(Chunks(inputs, 3)[1]), *Chunks.unpack(Chunks(inputs, 3)[0])]
    assert len(out) == 5
    alone = [inputs[i] for i in (3, 4, 0, 1, 2)]
    for (x, size, info), (y, size_y, info_y) in zip(out, alone):
        assert torch.equal(x, y) and size == size_y and info == info_y
    assert len({x.untyped_storage().data_ptr() for x, _, _ in out}) == 5
    assert all(x.untyped_storage().nbytes() == x.numel() * x.element_size() for x, _, _ in out)


def test_a_read_that_fails_in_a_worker_stops_the_export_at_its_own_file(tmp_path, monkeypatch):
    """An unexpected error while a loader worker reads file 6 of 8 (workers hand over runs
    of several files) is raised at that file, naming it: the shards before it are written."""
    from tokenizers_vq.modality import get as get_modality  # noqa: PLC0415

    files = photos(8)
    cls = type(get_modality("image"))
    real = cls.load_compact

    def load_compact(self, path, *args, **kwargs):
        if Path(path).name == files[6].name:
            raise OSError("disk went away")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(cls, "load_compact", load_compact)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=f"{files[6].name}: OSError: disk went away"):
        export_dataset(tiny("image"), files, out, shard_items=1, workers=1)
    assert sorted(f.name for f in out.glob("shard_*.bin")) == [f"shard_{i:05d}.bin" for i in range(6)]


def test_a_refused_file_ends_the_loader_workers_while_its_error_is_held(tmp_path):
    """The error of a corrupt photo, caught and kept by the caller, keeps no worker alive."""
    import multiprocessing  # noqa: PLC0415

    files = [*photos(3), tmp_path / "broken.png"]
    files[-1].write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    try:
        export_dataset(tiny("image"), files, tmp_path / "out", shard_items=2, workers=2)
    except ValueError as e:
        held = e
    assert "broken.png" in str(held) and multiprocessing.active_children() == []


def _items(xs):
    return iter([(Path(f"item{i}.png"), (x, list(x.shape[-2:]), {})) for i, x in enumerate(xs)])


def test_a_nan_input_found_after_the_next_batch_is_queued_names_its_own_file():
    """Batches' NaN/Inf checks are deferred until the batch is handed on; the refusal still
    names that batch's file, and the batches before it come out."""
    tok = tiny("image")
    xs = [torch.rand(3, 32, 32) for _ in range(3)]
    xs[1][0, 5, 5] = float("nan")
    got = []
    with pytest.raises(ValueError, match=r"item1\.png: image input contains NaN or Inf"):
        for chunk, _ in export_pipeline.encode_batches(tok, _items(xs), batch_size=1):
            got.append(chunk[0][0].name)
    assert got == ["item0.png"]


def test_video_bytes_and_floats_of_one_shape_are_batched_apart():
    """A video file is read as bytes, a folder of frames as floats: both in one export batch
    could not be stacked; each is encoded as its own read would be."""
    tok = tiny("video", clip_frames=5)
    frames = torch.randint(0, 256, (3, 5, 16, 16), dtype=torch.uint8)
    floats = tok.media.expand(frames.clone())
    got = [enc for _, enc in export_pipeline.encode_batches(tok, _items([frames, floats, frames]), batch_size=2)]
    assert sum(e.shape[0] for e in got) == 3
    codes = torch.cat(got)
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[0], tok.encode(floats[None])[0])


def test_a_long_video_is_expanded_a_clip_at_a_time_with_the_ids_of_one_encode(monkeypatch):
    """Three clips of a video in one export batch: each clip's frames are made floats on their
    own (a long video's float copy would be many times its bytes), and the ids equal one encode."""
    tok = tiny("video", clip_frames=5)
    frames = torch.randint(0, 256, (2, 3, 15, 16, 16), dtype=torch.uint8)
    expanded, real = [], tok.media.expand

    def counted(x):
        expanded.append(x.shape[2])
        return real(x)

    monkeypatch.setattr(tok.media, "expand", counted)
    got = torch.cat([enc for _, enc in export_pipeline.encode_batches(tok, _items(list(frames)), batch_size=2)])
    assert expanded == [5, 5, 5]
    assert torch.equal(got, tok.encode(real(frames)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_encode_batches_never_wait_for_the_device_between_batches(monkeypatch):
    """With CUDA's sync debug mode set to raise, batches are stacked, copied, encoded, copied
    back and checked without a stream sync; the only wait is for the batch handed on (an
    event recorded behind its own encode, after the next batch is queued)."""
    tok = tiny("image").cuda().eval()
    real, waits = export_pipeline._wait, []

    def allowed_wait(event):
        torch.cuda.set_sync_debug_mode(0)
        try:
            real(event)
            waits.append(event)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(export_pipeline, "_wait", allowed_wait)
    xs = [torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8) for _ in range(6)]
    export_pipeline.encode_batches(tok, _items(xs[:2]), batch_size=2).__next__()  # warm-up (kernel compiles)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = list(export_pipeline.encode_batches(tok, _items(xs), batch_size=2))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(waits) == 4 and all(c.device.type == "cpu" for _, c in out)  # 1 warm-up + 3 batches
    codes = torch.cat([c for _, c in out])
    assert torch.equal(codes, tok.encode(tok.media.expand(torch.stack(xs)).cuda()).cpu())


def test_an_earlier_batchs_deferred_failure_is_raised_before_a_later_batchs_own():
    """Batch 0 holds a NaN (found when it is handed on); batch 1 is refused at once (too small):
    the error is batch 0's, naming its file."""
    tok = tiny("image")
    xs = [torch.rand(3, 32, 32), torch.rand(3, 4, 4)]
    xs[0][0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"item0\.png: image input contains NaN or Inf"):
        list(export_pipeline.encode_batches(tok, _items(xs), batch_size=1))


def test_the_encode_runs_on_into_the_next_shard_before_a_shard_is_written(tmp_path, monkeypatch):
    """Batches never cross shards, but the pipeline does not drain at a shard's end: shard k+1's
    first batch is queued before shard k is written. A file listed twice in one shard is
    encoded twice and indexed twice."""
    files = photos(3)
    files = [files[0], files[0], files[1], files[2]]
    tok = tiny("image")
    log, real_encode, real_write = [], type(tok).encode, export.atomic_write

    def encode(self, x):
        log.append("encode")
        return real_encode(self, x)

    def atomic_write(path, fn, *args, **kwargs):
        if Path(path).suffix == ".bin":
            log.append(Path(path).stem)
        return real_write(path, fn, *args, **kwargs)

    monkeypatch.setattr(type(tok), "encode", encode)
    monkeypatch.setattr(export, "atomic_write", atomic_write)
    export_dataset(tok, files, tmp_path / "x", shard_items=2, batch_size=1)
    assert log == ["encode", "encode", "encode", "shard_00000", "encode", "shard_00001"]
    index = json.loads((tmp_path / "x" / "shard_00000.json").read_text())["items"]
    assert [it["source"] for it in index] == [files[0].name] * 2


def test_padded_batch_sizes_come_in_quarters_of_the_batch():
    assert [export_pipeline.padded_batch(n, 64) for n in (1, 16, 17, 33, 63, 64)] == [16, 16, 32, 48, 64, 64]
    assert [export_pipeline.padded_batch(n, 16) for n in (1, 5, 13, 16)] == [4, 8, 16, 16]
    assert [export_pipeline.padded_batch(n, 1) for n in (1,)] == [1]


def test_short_groups_filled_up_give_the_codes_of_the_unpadded_encode(monkeypatch):
    """Inputs of two shapes alternate, so groups go out short; filled up with copies of
    their last input, the model sees the padded sizes alone and the codes handed on are the
    inputs' own, in order."""
    tok = tiny("image")
    torch.manual_seed(0)
    xs = [torch.randint(0, 256, (3, 32, 48) if i % 3 else (3, 48, 32), dtype=torch.uint8) for i in range(11)]
    seen, real = [], tok.encode

    def spy(x):
        seen.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(tok, "encode", spy)
    padded = list(export_pipeline.encode_batches(tok, _items(xs), batch_size=8, pad=True))
    assert set(seen) <= {2, 4, 6, 8} and sum(seen) > len(xs)
    seen.clear()
    plain = list(export_pipeline.encode_batches(tok, _items(xs), batch_size=8, pad=False))
    assert sum(seen) == len(xs)
    assert [[f.name for f, _, _ in c] for c, _ in padded] == [[f.name for f, _, _ in c] for c, _ in plain]
    for (_, a), (_, b) in zip(padded, plain):
        assert torch.equal(a, b)
