"""WebDataset tar shards as inputs: samples read straight from the archive, never extracted.

A WebDataset shard is a plain tar whose members are grouped into samples by *key*: the
member's path up to the first dot of its file name (``shard/000123.jpg`` and
``shard/000123.cls`` are the sample ``shard/000123``; as WebDataset groups them, a sample is
a run of consecutive members). :func:`list_tar_samples` lists the samples that hold a member
of a modality (one per sample: the one of a plain field, ``000123.png`` rather than
``000123.mask.png``); :meth:`TarSample.load` reads that member's bytes and decodes them like
a file. An archive that ends without its end-of-archive block (cut short at a member boundary)
is refused, not read as fewer samples.

Sources are local tar files (any compression ``tarfile`` reads) or ``pipe:COMMAND`` URLs,
whose command writes a tar to its standard output (``pipe:curl -s https://.../shard-0001.tar``,
``pipe:aws s3 cp s3://... -``), as WebDataset spells them. Archives are read as streams,
forward only: listing reads one pass, and loading the samples in archive order reads one
more (a member asked for out of order starts the stream again), in the process that asks
(an export reads tar samples in its main process, whatever its loader workers). A member's
bytes pass through a temporary file only while they are decoded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from torch import Tensor

from tokenizers_vq.io import TAR_SUFFIXES
from tokenizers_vq.media import SUFFIXES, load_input, suffix_modality
from tokenizers_vq.modality import get as get_modality


def is_tar_source(source: str | os.PathLike) -> bool:
    """A ``pipe:`` URL, or a path whose name ends in ``.tar`` (``.tar.gz``, ``.tgz``, ...)."""
    s = str(source)
    return s.startswith("pipe:") or s.lower().endswith(TAR_SUFFIXES)


def sample_key(member: str) -> str:
    """WebDataset's key of a member: its path up to the first dot of its file name."""
    p = PurePosixPath(member)
    return str(p.parent / p.name.split(".", 1)[0]) if str(p.parent) != "." else p.name.split(".", 1)[0]


@dataclass(frozen=True)
class TarSample:
    """One sample of a tar source: ``member`` (its media member's path in the archive) of
    ``source`` (a tar path or ``pipe:`` URL), ``key`` (WebDataset's sample key), the
    member's ``size`` in bytes and its ``position`` among the archive's files (an archive
    may hold two members of one name: the position says which)."""

    source: str
    member: str
    key: str
    size: int
    position: int = -1  # the member's place among the archive's files (-1: the first of that name)

    @property
    def name(self) -> str:
        """The media member's file name (the ``source`` an export's index records)."""
        return PurePosixPath(self.member).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.member).suffix

    def __str__(self) -> str:
        return f"{self.source}::{self.member}"

    def load(self, modality: str, sample_rate: int | None = None, **kw: Any) -> tuple[Tensor, list[int], dict[str, Any]]:
        """:func:`~tokenizers_vq.media.load_input` of the member's bytes; ``info`` adds
        the sample's ``key``."""
        data = _reader(self.source).read(self.member, self.position)
        with tempfile.TemporaryDirectory(prefix="tvq-tar-") as d:
            tmp = Path(d) / f"member{self.suffix}"  # (a member's own name may be longer than a file name may be)
            tmp.write_bytes(data)
            try:
                x, size, info = load_input(tmp, modality, sample_rate, **kw)
            except ValueError as e:  # name the member, not the temporary file
                raise ValueError(str(e).replace(str(tmp), str(self))) from None
        return x, size, {**info, "key": self.key}


def _members(source: str) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """The regular-file members of ``source`` in archive order, from one forward pass.
    A ``pipe:`` command's standard error goes to a temporary file (a full pipe would
    stall it), and a command that exits with an error fails the pass even where the
    bytes it wrote looked like a whole archive (a dropped download ends at a member); of a
    pipeline, the shell's status is the last command's, so an unreadable archive also names
    what the command wrote to its standard error."""
    proc = err = None
    if source.startswith("pipe:"):
        err, proc = _start(source)
        stream: IO[bytes] = proc.stdout
    elif Path(source).is_file():
        stream = open(source, "rb")  # noqa: SIM115  (closed below)
    else:
        raise ValueError(f"tar source not found: {source}")
    finished = False
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if info.isfile():
                        yield info, tar
                # tarfile takes an archive that stops at a member (no end-of-archive block) as
                # ended: a copy or download cut there lists fewer samples without a word
                if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"the archive ends after {tar.offset} bytes (uncompressed) without its "
                                            "end-of-archive block: cut short (copy or download it again), or "
                                            "compressed as several concatenated streams, which a stream read does "
                                            "not follow (decompress it first)")
        except (tarfile.TarError, EOFError) as e:
            _failed_command(proc, err, source, e)
            raise ValueError(f"cannot read tar {source}: {e}") from e
        finished = True
    finally:
        if proc is not None and finished:
            while stream.read(1 << 20):  # the rest (end blocks, padding), then the exit status
                pass
            proc.wait()
        stream.close()
        if proc is not None:
            if not finished:  # closed early (or failed): stop the command
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            failure = _command_failure(proc, err, source)
            err.close()
            if finished and proc.returncode != 0:
                raise ValueError(f"{failure}; its archive may be cut short")


def _start(source: str) -> tuple[IO[bytes], subprocess.Popen]:
    """Start a ``pipe:`` URL's command in a shell, as WebDataset does (``pipe:curl -s URL || true``,
    pipelines), its standard error into a temporary file (a full pipe would stall it)."""
    command = source[5:].strip()
    if not command:
        raise ValueError(f"{source!r} names no command: pipe:COMMAND writes a tar to its standard output")
    err = tempfile.TemporaryFile()
    try:
        # its own process group: stopping it stops every command of a pipeline
        return err, subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=err, start_new_session=True)  # (tvq's own input is not the command's)
    except OSError as e:
        err.close()
        raise ValueError(f"{source}: cannot run the shell /bin/sh: {e.strerror}") from None


def _failed_command(proc: subprocess.Popen | None, err: IO[bytes] | None, source: str, why: Exception) -> None:
    """Raise the command's own failure, where a ``pipe:`` source's archive could not be
    read because its command failed (its status and the end of its standard error)."""
    if proc is None:
        return
    proc.stdout.close()  # a command still writing gets SIGPIPE, not a wait
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return
    if proc.returncode not in (0, -signal.SIGPIPE, 128 + signal.SIGPIPE):  # (the shell's word for SIGPIPE)
        raise ValueError(f"{_command_failure(proc, err, source)} (its archive: {why})")
    if said := _stderr_tail(err):  # a pipeline's or `|| true`'s failure, status 0
        raise ValueError(f"cannot read tar {source}: {why}; its command said: {said}")


def _stderr_tail(err: IO[bytes]) -> str:
    """The end of what a ``pipe:`` source's command wrote to its standard error."""
    err.seek(0)
    return err.read().decode(errors="replace").strip()[-300:]


def _command_failure(proc: subprocess.Popen, err: IO[bytes], source: str) -> str:
    """The exit status of a ``pipe:`` source's command and the end of its standard error."""
    message = _stderr_tail(err)
    return f"{source}: the command exited with status {proc.returncode}" + (f": {message}" if message else "")


class _ForwardReader:
    """Member bytes of one source, read forward through a single open stream."""

    def __init__(self, source: str):
        self.source, self._it = source, None

    def read(self, member: str, position: int = -1) -> bytes:
        """The bytes of ``member``, the one at ``position`` among the files (-1: the
        first of that name)."""
        for _ in range(2):  # on from the current position, then once from the start
            if self._it is None:
                self._it = enumerate(_members(self.source))
            for i, (info, tar) in self._it:
                if info.name == member and position in (-1, i):
                    try:
                        return tar.extractfile(info).read()
                    except (tarfile.TarError, EOFError, OSError) as e:
                        self._it = None
                        raise ValueError(f"cannot read {member!r} of {self.source}: {e} (the archive is damaged or "
                                         "cut short: copy or download it again)") from None
            self._it = None
        raise ValueError(f"{self.source} has no member {member!r}")


_READERS: dict[tuple[int, str], _ForwardReader] = {}


def close_readers() -> None:
    """Forget this process's open readers (the next read starts each stream afresh)."""
    _READERS.clear()


def _reader(source: str) -> _ForwardReader:
    """This process's reader of ``source``."""
    key = (os.getpid(), source)
    if key not in _READERS:
        _READERS[key] = _ForwardReader(source)
    return _READERS[key]


def list_tar_samples(source: str | os.PathLike, modality: str, notes: list[str] | None = None) -> list[TarSample]:
    """The samples of a WebDataset tar (path or ``pipe:`` URL) that hold a member of
    ``modality`` (by its suffix, :data:`~tokenizers_vq.media.SUFFIXES`), in archive order.

    A sample is a run of consecutive members of one key, as WebDataset groups them. Of its
    ``modality`` members, the one whose field is a plain suffix (``000123.jpg``, not
    ``000123.mask.png``) is coded (a sample with no plain one codes its only candidate, named in
    the index); a sample with several such candidates is refused, naming them. ``notes`` (when given) receives a line on the members of other modalities left out.

    Raises:
        ValueError: an unreadable archive, a failed ``pipe:`` command, no such member, or
            a sample of several candidates (e.g. a plain tar of files with dots in their names).
    """
    source = str(source)
    samples: list[TarSample] = []
    others: dict[str, int] = {}
    run: list[tuple[int, tarfile.TarInfo]] = []  # the current sample's members of the modality
    last_key = None

    def close_run() -> None:
        plain = [(i, m) for i, m in run if "." not in PurePosixPath(m.name).name.split(".", 1)[1]]
        picks = plain or run
        if len(picks) > 1:
            names = ", ".join(m.name for _, m in picks[:4]) + (", ..." if len(picks) > 4 else "")
            raise ValueError(f"{source}: the sample {last_key!r} holds {len(picks)} {modality} members ({names}), "
                             "grouped by WebDataset's key (the path up to the first dot of the file name); one is "
                             "coded per sample: repack with one per key, or extract the archive and export the folder")
        if picks:
            i, m = picks[0]
            samples.append(TarSample(source, m.name, last_key, m.size, i))
        run.clear()

    for i, (info, _) in enumerate(_members(source)):
        key, kind = sample_key(info.name), suffix_modality(info.name)
        if key != last_key:
            close_run()
        if kind == modality:
            run.append((i, info))
        elif kind is not None:
            others[kind] = others.get(kind, 0) + 1
        last_key = key
    close_run()
    if not samples:
        held = "".join(f"; it holds {n} {m} members: pass a model for them (--model {get_modality(m).default_model})"
                       for m, n in others.items())
        raise ValueError(f"no {modality} members ({', '.join(sorted(SUFFIXES[modality]))}) in {source}{held}")
    if notes is not None:
        notes.extend(f"tvq: note: {source} also holds {n} {m} member{'s' * (n > 1)}, left out: this run takes its "
                     f"{modality} members; run again with --model {get_modality(m).default_model} for those"
                     for m, n in others.items())
    return samples
