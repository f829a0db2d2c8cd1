"""The files a training run trains on and holds apart, as its checkpoints record them, and the
check a resumed run makes against that record: a run must never hold apart (and so score as
unseen) a file that any earlier part of it trained on.

A checkpoint records the names of this and every earlier segment's training files (relative to
their folder) and a fingerprint of each (its size and a hash of its first and last 4 KiB), so a
held-apart file is recognised by name inside the training folder and, by content, wherever it
lies: a copy in another folder, or the old training folder under a new name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

EDGE_BYTES = 4096


def fingerprint(path: Path) -> str:
    """``size:hash`` of a file: its size in bytes and a BLAKE2b hash of its first and last
    :data:`EDGE_BYTES` bytes (the whole file when it is smaller). Equal for copies of a file;
    different files of one size differ in these bytes in practice (a header, the first
    samples or pixels, the last ones). A folder (a video as numbered frames): its files' sizes
    summed, and a hash of their names and fingerprints."""
    path = Path(path)
    if path.is_dir():
        parts = [(f.name, fingerprint(f)) for f in sorted(path.iterdir()) if f.is_file()]
        h = hashlib.blake2b("\n".join(f"{n}/{fp}" for n, fp in parts).encode(), digest_size=10)
        return f"{sum(int(fp.split(':')[0]) for _, fp in parts)}:{h.hexdigest()}"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.blake2b(f.read(EDGE_BYTES), digest_size=10)
        if size > EDGE_BYTES:
            f.seek(max(size - EDGE_BYTES, EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    return f"{size}:{h.hexdigest()}"


def _names(files: list[Path], root: str) -> list[str]:
    return [(p.relative_to(root) if p.is_relative_to(root) else p).as_posix() for p in map(Path, files)]


class RunFiles:
    """What one run trains on and holds apart (``val_root``: data.val, or None when the held-apart
    files are the last of data.train), with what earlier segments of the run trained on once
    :meth:`resume_check` has read their checkpoint."""

    def __init__(self, train: list[Path], val: list[Path], train_root: str, val_root: str | None):
        self.train_paths = [Path(p) for p in train]
        self.train, self.val = _names(train, train_root), _names(val, val_root or train_root)
        self.val_from = "data.val" if val_root else "data.train"
        resolved_root = Path(train_root).resolve()

        def inside(p: Path) -> str | None:  # a data.val file's name within data.train, as the paths or as resolved
            for path, root in ((p, Path(train_root)), (p.resolve(), resolved_root)):
                if path.is_relative_to(root):
                    return path.relative_to(root).as_posix()
            return None

        self.val_in_train = [n for n in map(inside, map(Path, val)) if n is not None]
        self.val_paths = [Path(p) for p in val]
        self.earlier: set[str] = set()  # names trained on by earlier segments
        self.earlier_prints: set[str] = set()
        self._prints: set[str] | None = None
        self._record: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The checkpoint's record (JSON): this segment's names, and every segment's training
        names and fingerprints (worked out on the first call, this segment's files read then)."""
        if self._record is None:
            self._record = {"train": self.train, "val": self.val, "val_from": self.val_from,
                            "val_in_train": self.val_in_train, "trained": sorted(self.earlier | set(self.train)),
                            "trained_prints": sorted(self.earlier_prints | self._train_prints())}
        return self._record

    def _train_prints(self) -> set[str]:
        if self._prints is None:
            self._prints = {fingerprint(p) for p in self.train_paths}
        return self._prints

    def resume_check(self, directory: Path, saved: dict[str, Any] | None) -> str:
        """What changed in words between the record of the checkpoint in ``directory`` (None:
        written before it kept one) and this run; refused when this run would hold apart files
        that it, or an earlier segment, trained on (its validation would score them). Later
        records carry the checkpoint's training names and fingerprints on."""
        if not saved:
            return ""
        trained, training = set(saved["train"]), set(self.train)
        self.earlier = trained | set(saved.get("trained", ()))
        self.earlier_prints = set(saved.get("trained_prints", ()))
        self._record = None
        held = sorted(self.earlier & set(self.val_in_train))
        if held:
            why = ("data.train or data.val_fraction changed since, so the last files of the list are others; resume with "
                   "the data as it was, name the files to hold apart with --data.val=DIR" if self.val_from == "data.train"
                   else "data.val names files inside data.train that it trained on; resume with the data as it was, "
                   "hold apart a folder it did not train on")
        else:
            val_prints = {fingerprint(p): name for p, name in zip(self.val_paths, self.val)} if self.earlier_prints else {}
            copies = self.earlier_prints.intersection(val_prints)
            if copies:  # (a copy among this run's own training files too is no change since: a new run takes it as well)
                copies -= self._train_prints()
            held = sorted(val_prints[fp] for fp in copies)
            why = ("they are copies of files it trained on (the same size and bytes) under another folder or name, which "
                   "this run does not train on: hold apart files it did not train on")
        if held:
            raise ValueError(f"checkpoint {directory} trained on {len(held)} of the files this run would hold apart "
                             f"({', '.join(held[:3])}{', ...' * (len(held) > 3)}): {why}, or train in a new "
                             f"out_dir with --init_from {directory}")
        changes = [f"{n} training file{'s' * (n != 1)} {what}" for n, what in
                   ((len(training - trained), "added"), (len(trained - training), "left out")) if n]
        if set(saved["val"]) != set(self.val) or saved.get("val_from") != self.val_from:
            changes.append("the files held apart changed")
        return ", ".join(changes)
