"""The harness of the media fuzz tests: the real source files, a reader worker process
with a time limit per call and a cap on its address space, the fixtures, and the
property every reader call must satisfy (a valid result, or a ValueError naming the
file)."""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tokenizer import tiny
from testdata import shared_path


WORKER = Path(__file__).parent / "fuzz" / "media_worker.py"
ANSWER = "@answer "
MEMORY_LIMIT = 6 * 2**30  # the worker's address space: torch, PyAV and a decoded clip fit well within it
CALL_TIMEOUT = 60.0  # seconds for one reader call; the slowest valid one takes about a second

SOURCES = {  # small real files of each container the readers take
    ".jpg": ("images", "bsds500", "val", "3096.jpg"),
    ".png": ("images", "wikipedia_photos", "016.png"),
    ".wav": ("audio", "fsdd", "6_nicolas_9.wav"),
    ".flac": ("audio", "librispeech_train-clean-100", "1447-130550-0000.flac"),
    ".ogg": ("audio", "librosa", "456440__inspectorj__bird-whistling-robin-single-13.hq.ogg"),
    ".mp4": ("video", "imageio_realshort.mp4"),
    ".avi": ("video", "mmaction2_test.avi"),
}
FRAME = ("video", "siammask_tennis", "00000.jpg")
SUFFIXES = [".jpg", ".png", ".wav", ".flac", ".ogg", ".mp4", ".avi", ".mkv", ".bmp", ".webp", ".mp3", ".bin", ""]
MODALITY = {".jpg": "image", ".png": "image", ".bmp": "image", ".webp": "image", ".wav": "audio", ".flac": "audio",
            ".ogg": "audio", ".mp3": "audio", ".mp4": "video", ".avi": "video", ".mkv": "video"}
SAMPLE_RATE = 16000
MAX_FRAMES = 6


class Worker:
    """tests/fuzz/media_worker.py, started on first use and again after a hang or a crash."""

    def __init__(self, log: Path):
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.buffer = b""

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen([sys.executable, str(WORKER), str(MEMORY_LIMIT)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=env)
        self.buffer = b""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def ask(self, request: dict, timeout: float = CALL_TIMEOUT) -> dict:
        """The worker's answer to ``request``; fails the test on a hang or a crash."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
            timeout += 120  # imports
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if sep:
                self.buffer = rest
                if line.startswith(ANSWER.encode()):
                    return json.loads(line[len(ANSWER) :])
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise AssertionError(f"{request} did not finish within {timeout:.0f} s (a hang)")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self.proc.wait()
                self.proc = None
                tail = self.log.read_text(errors="replace")[-2000:]
                raise AssertionError(f"the reader process died (exit code {code}) on {request}:\n{tail}")
            self.buffer += chunk


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("worker") / "stderr.txt")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random tokenizers, one per modality, saved as ``tvq --model`` folders."""
    root = tmp_path_factory.mktemp("models")
    return {m: tiny(m).save_pretrained(root / m) for m in ("image", "audio", "video")}


class Sources(dict):
    """The bytes of the real files, by suffix (``"frame"``: a video frame)."""

    def __repr__(self) -> str:  # a falsifying example prints its arguments
        return "Sources()"


@pytest.fixture(scope="module")
def sources() -> Sources:
    data = Sources({suffix: shared_path(*parts).read_bytes() for suffix, parts in SOURCES.items()})
    data["frame"] = shared_path(*FRAME).read_bytes()
    return data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A new folder name per call (hypothesis runs many examples in one test call)."""
    root, counter = tmp_path_factory.mktemp("cases"), itertools.count()
    return lambda: root / f"case{next(counter)}"


# -- the property ------------------------------------------------------------------------
def names_file(message: str, path: Path) -> bool:
    return str(path) in message


def check_reader(call: str, answer: dict, path: Path) -> None:
    """A valid result, or a ValueError naming ``path``."""
    if "error" in answer:
        assert answer["error"] == "ValueError", f"{call}({path.name}) raised {answer['error']}:\n{answer['traceback']}"
        assert names_file(answer["message"], path), f"{call}: the message does not name the file: {answer['message']}"
        return
    value = answer["value"]
    if call == "modality_of":
        assert value in ("image", "audio", "video")
    elif call == "load_image":
        check_tensor(value, 3, lo=0.0, hi=1.0)
        assert value["shape"][0] == 3
    elif call == "load_audio":
        wav, sr = value
        check_tensor(wav, 2)
        assert sr == SAMPLE_RATE
    elif call == "load_video":
        frames, fps = value
        check_tensor(frames, 4, lo=0.0, hi=1.0)
        assert frames["shape"][1] == 3 and frames["shape"][0] <= MAX_FRAMES
        assert isinstance(fps, float) and 0 < fps < float("inf"), fps


def check_input(answer: dict, path: Path, modality: str) -> None:
    if "error" in answer:
        check_reader("load_input", answer, path)
        return
    x, size, info = answer["value"]
    if modality == "audio":
        check_tensor(x, 2)
        assert x["shape"][0] == 1 and size == x["shape"][1:] and info["sample_rate"] == SAMPLE_RATE
    else:
        check_tensor(x, 3 if modality == "image" else 4, lo=-1.0, hi=1.0)
        assert x["shape"][0] == 3 and size == x["shape"][1:]
    if modality == "video":
        assert isinstance(info["fps"], float) and 0 < info["fps"] < float("inf"), info
    assert info["channels"] >= 1


def check_tensor(t: dict, ndim: int, lo: float | None = None, hi: float | None = None) -> None:
    assert t["dtype"] == "torch.float32" and len(t["shape"]) == ndim and all(s > 0 for s in t["shape"]), t
    assert t["finite"], t
    if lo is not None:
        assert lo <= t["min"] and t["max"] <= hi, t


def check_encode(answer: dict, path: Path) -> None:
    assert "value" in answer, f"tvq encode raised {answer['error']}:\n{answer['traceback']}"
    out = answer["value"]
    if out["rc"] == 0:
        (item,) = out["items"]
        codes = item["codes"]
        assert codes["dtype"] in ("torch.int32", "torch.int64") and 0 <= codes["min"] and codes["max"] < out["codebook_size"]
        return
    assert out["rc"] == 2 and out["stderr"].startswith("tvq: error:"), out
    assert names_file(out["stderr"], path), f"tvq encode's error does not name the file: {out['stderr']}"


def read_everything(worker: Worker, models: dict[str, Path], path: Path, encode_with: str | None) -> None:
    """Every reader on ``path``, then ``tvq encode`` with the ``encode_with`` model
    (``"suffix"``: the model of the modality ``modality_of`` gives, else the suffix's,
    else image)."""
    p = str(path)
    for call, args in [("modality_of", [p]), ("load_image", [p]), ("load_audio", [p, SAMPLE_RATE]),
                       ("load_video", [p, MAX_FRAMES])]:
        check_reader(call, worker.ask({"call": call, "args": args}), path)
    guess = worker.ask({"call": "modality_of", "args": [p, "image"]})
    modality = guess.get("value", MODALITY.get(path.suffix.lower(), "image"))
    check_input(worker.ask({"call": "load_input", "args": [p, modality, SAMPLE_RATE, MAX_FRAMES]}), path, modality)
    if encode_with is not None:
        model = models[modality if encode_with == "suffix" else encode_with]
        argv = ["encode", p, "-o", str(path.parent / f"{path.name}.tvq"), "--model", str(model), "--device", "cpu"]
        check_encode(worker.ask({"call": "encode", "argv": argv}), path)


# -- files -------------------------------------------------------------------------------
