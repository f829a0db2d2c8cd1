"""Media in and out. Images through PIL; every write is atomic (a temporary file
renamed into place), so a failed write never leaves a half-written or clobbered file."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shlex
import shutil
import stat
import struct
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from tokenizers_vq.errors import WriteError


AUDIO_FORMATS = {".oga": ("OGG", None), ".opus": ("OGG", "OPUS"), ".aif": ("AIFF", None)}
"""Audio suffixes libsndfile does not name its formats by: ``(format, sample coding)`` to write them as
(any other suffix is the format's own name, ``.wav``, ``.flac``, ``.aiff``...)."""

WRITES = {"image": (".png", ".jpg", ".webp"), "audio": (".wav", ".flac", ".ogg"), "video": (".mp4", ".m4v", ".mov", ".mkv")}
"""File suffixes each modality is written as (images: also any other format Pillow writes, e.g.
.tiff or .bmp; audio: any other format the installed libsndfile writes, e.g. .mp3 or .aiff)."""


MAX_FPS = 1_000_000
"""The highest frame rate a video is written at (its rate as a fraction of at most 1001ths must fit 32 bits)."""
MIN_FPS = 1 / 1001
"""The lowest frame rate a video is written at (one frame in 1001 seconds)."""

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
"""Archive names read as WebDataset shards (any case); Python's tarfile reads these compressions."""


IMAGE_SIDES = {"JPEG": (65500, 65500), "MPO": (65500, 65500), "PDF": (65500, 65500), "GIF": (65535, 65535),
               "TGA": (65535, 65535), "SGI": (65535, 65535), "PCX": (65534, 65535), "WEBP": (16383, 16383),
               "AVIF": (32768, 32768)}
"""The widest and tallest picture (pixels) each Pillow format with a limit holds (PDF: as a JPEG in it;
PCX: a row's bytes, padded to an even count, fit 16 bits; AVIF: libavif writes 65536 a side but reads
back at most 32768, which :func:`~tokenizers_vq.image_io.load_image_u8` could not read)."""

UNWRITTEN_AUDIO = {"SD2": "libsndfile writes a Sound Designer II file's resource fork as a second file beside it, "
                          "which the finished file's rename leaves behind, and the file alone does not read back"}
"""libsndfile formats that a write through a renamed temporary file cannot produce, and why."""


def check_writable(modality: str, path: str | os.PathLike, size: Sequence[int] | None = None) -> None:
    """Refuse an output file name whose suffix ``modality`` is not written as, or (``size``: a picture's
    ``(..., height, width)``, as a token record's ``size``, when known) an image format too small for it."""
    suffix = Path(path).suffix.lower()
    if modality == "image" and size is not None:
        check_image_size(path, size[-1], size[-2])
    if suffix in WRITES.get(modality, (suffix,)):
        return
    why = ""
    if modality == "audio" and suffix[1:]:
        import soundfile as sf  # noqa: PLC0415

        fmt = AUDIO_FORMATS.get(suffix, (suffix[1:].upper(),))[0]  # else soundfile's own rule for a file name
        if fmt in UNWRITTEN_AUDIO:
            why = f" ({UNWRITTEN_AUDIO[fmt]})"
        elif fmt in sf.available_formats() and sf.default_subtype(fmt) is not None:  # (one with a coding it writes)
            return
    if modality == "image":
        from PIL import Image  # noqa: PLC0415

        fmt = Image.registered_extensions().get(suffix)  # Pillow's own rule for a file name
        if fmt in Image.SAVE and not (why := _image_format_changes(fmt)):
            return
    raise ValueError(f"cannot write {modality} as {suffix or 'a file without a suffix'} ({path}){why}: "
                     f"name it {', '.join(WRITES[modality])}")


def check_image_size(path: str | os.PathLike, width: int, height: int) -> None:
    """Refuse a ``width`` x ``height`` picture for a file whose format (by its suffix, as Pillow
    picks it) holds no picture that large (:data:`IMAGE_SIDES`), naming the limit and a fix."""
    from PIL import Image  # noqa: PLC0415

    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    most = IMAGE_SIDES.get(fmt, (width, height))
    if width > most[0] or height > most[1]:
        raise ValueError(f"cannot write {path}: a {width}x{height} picture is larger than {fmt} holds (at most "
                         f"{most[0]} pixels wide and {most[1]} high); name it .png")


@functools.cache
def _image_format_changes(fmt: str) -> str:
    """What Pillow's ``fmt`` writer does to an RGB picture of 300 x 200 pixels that a decode must not
    (fail on it, or store another size: ICO shrinks to 256 a side, ICNS stretches to a square); "" if
    nothing (a format Pillow writes but cannot read back is taken as written)."""
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    try:
        Image.new("RGB", (300, 200), (200, 100, 50)).save(buf, format=fmt)
    except Exception as e:  # noqa: BLE001  (any refusal of Pillow's writer: OSError, KeyError, ValueError)
        return f" (Pillow's {fmt} writer: {e})"
    try:
        with Image.open(buf) as back:
            size = back.size
    except Exception:  # noqa: BLE001  (written, not readable back: nothing to compare)
        return ""
    return f" (Pillow's {fmt} writer stores a 300x200 picture as {size[0]}x{size[1]})" if size != (300, 200) else ""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file sits beside ``path`` (same filesystem, so the rename is
    atomic) and keeps ``path``'s suffix so writers that pick a format by suffix work.

    A symbolic link keeps pointing where it did: the file it names is the one replaced.

    Raises:
        ValueError: ``path`` is an existing directory, device, named pipe or socket, or its
            folder is an existing file.
        WriteError: (an ``OSError``) the folder cannot be made or written to, or the write
            fails (a full disk): the message names ``path`` (not the temporary file); ``path``
            is left as it was.
    """
    return atomic_write_all({path: write})[0]


def atomic_write_all(writes: dict[str | os.PathLike, Callable[[str], None]]) -> list[Path]:
    """:func:`atomic_write` of several files that belong together (a model's weights and
    its config): every temporary file is written before the first rename, and a rename that
    fails (or an interrupt between them) puts back the files already replaced, so a failed
    save leaves every file as it was, never a new one beside an old one (short of a crash of
    the machine between two renames). Raises as :func:`atomic_write`; returns the paths in
    the given order."""
    done: dict[Path, str] = {}  # each file's temporary, until it is renamed
    kept: dict[Path, str | None] = {}  # each renamed file's earlier one (None: there was none), several files only
    given = {_final_target(Path(p)): Path(p) for p in writes}  # the file replaced (a link's target): the name given
    if len(given) < len(writes):
        raise ValueError(f"{', '.join(map(str, writes))} name the same file (through links): each needs its own")
    current = next(iter(given))
    try:
        for (path, named), write in zip(given.items(), writes.values()):
            current = path
            done[path] = _temporary_beside(path, named)
            write(done[path])
        for path, tmp in done.items():
            current = path
            os.chmod(tmp, usual_mode(tmp))  # mkstemp makes 0600 files
        for path, tmp in list(done.items()):
            current = path
            if len(writes) > 1:  # (one file alone: its rename is the whole save, nothing to put back)
                kept[path] = _kept_copy(path)
            os.replace(tmp, path)
            del done[path]
    except BaseException as e:
        for path, old in kept.items():
            if path not in done or not os.path.lexists(done[path]):  # renamed (an interrupt may beat the book-keeping)
                os.replace(old, path) if old is not None else path.unlink(missing_ok=True)
            elif old is not None:
                os.unlink(old)
        for tmp in done.values():
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and not isinstance(e, WriteError):  # named once
            raise _naming(e, given.get(current, current)) from e
        raise
    for old in kept.values():  # every file is in place: a copy that cannot be removed is no failed save
        if old is not None:
            with contextlib.suppress(OSError):
                os.unlink(old)
    return [Path(p) for p in writes]


def usual_mode(path: str | os.PathLike) -> int:
    """The mode a new file (0o666) or folder (0o777) at ``path`` gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if os.path.isdir(path) else 0o666) & ~umask


def _kept_copy(path: Path) -> str | None:
    """A second name (a hard link, else a copy) for ``path``'s current file beside it, or None
    when there is none: what a failed multi-file write puts back."""
    if not path.is_file():
        return None
    keep = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.kept")
    try:
        os.link(path, keep)
    except OSError:  # a filesystem without hard links
        shutil.copy2(path, keep)
    return keep


def write_bytes(data, path: str | os.PathLike) -> None:
    """Write a buffer (bytes, a C-contiguous numpy array) to ``path``, raising ``OSError``
    when fewer bytes land than were given (``ndarray.tofile`` can end short on a full disk
    without an error)."""
    view = memoryview(data).cast("B")
    with open(path, "wb") as f:
        f.write(view)
    if os.path.getsize(path) != view.nbytes:
        raise OSError(errno.ENOSPC, f"{os.path.getsize(path)} of {view.nbytes} bytes written", str(path))


def device_named(map_location: str | torch.device) -> torch.device:
    """``map_location`` as a device this machine has, or a ValueError naming it."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise ValueError(f"map_location={map_location!r}: not a device name torch knows (e.g. 'cpu', 'cuda:0')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location={map_location!r}: torch sees no CUDA GPU on this machine; load with 'cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"map_location={map_location!r}: load with 'cpu' or 'cuda' (then move the model: .to(...))")
    return device


def check_can_write(path: str | os.PathLike) -> None:
    """Raise now what :func:`atomic_write` of ``path`` would raise before writing (``path`` a
    directory, a file where a folder is needed, a folder that cannot be written), for work
    that ends in that write; nothing is made (a temporary file in the nearest existing
    folder is made and removed)."""
    path = Path(path)
    folder = _check_target(path)
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: {folder} is a file, not a directory")
    os.unlink(_temporary_in(folder, path))


def _final_target(path: Path) -> Path:
    """The file a write to ``path`` replaces: the one a symbolic link names (the link stays a
    link, its target gets the new file), else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
            (stat.S_ISSOCK, "a socket"))


def _check_target(path: Path) -> Path:
    """``path``'s folder, once ``path`` is known not to be a directory, a device, pipe or socket
    (a finished file is renamed onto the target, which would replace the device or pipe itself)
    nor inside a file."""
    path = _final_target(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, but a file is written here; give a file name "
                         f"(e.g. {path / ('out' + (path.suffix or '.tvq'))})")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0  # absent (or unreadable: the write says why)
    for test, what in _SPECIAL:
        if test(mode):
            raise ValueError(f"{path} is {what}, not a file: outputs are written to a temporary file renamed onto "
                             f"their path, which would replace {what}; give a file path")
    if stat.S_ISREG(mode) and not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):  # (root could: not asked to)
        raise ValueError(f"{path} is read-only, and the output would replace it: name another file, or make it "
                         f"writable first (chmod u+w {shell_arg(str(path))})")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: {path.parent} is a file, not a directory")
    return path.parent


def _temporary_beside(path: Path, named: Path) -> str:
    """An empty temporary file in ``path``'s folder (made if missing), named after ``named``
    (the name given: a writer picks the format by its suffix, which a link's target may lack)."""
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _naming(e, named) from None
    return _temporary_in(path.parent, named)


TEMPORARY_TAG = "tvq-tmp-"
"""In the name of a temporary file beside its target, ``.<stem>.tvq-tmp-<8 characters><suffix>``
(distinct from a user's hidden files, which a finished export's clean-up must not take for its own)."""


def _temporary_in(folder: Path, path: Path) -> str:
    """An empty temporary file in ``folder`` named after ``path``; an error names ``path``."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{TEMPORARY_TAG}", suffix=path.suffix, dir=folder)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    return tmp


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` as a :class:`~tokenizers_vq.errors.WriteError` (same errno) whose message names ``path``."""
    return WriteError(e.errno, f"cannot write {path}: {e.strerror or e}")


def state_sha256(state: dict[str, Tensor]) -> str:
    """Hex sha256 over tensors by name: each one's name, dtype, shape and bytes (the same for
    the same tensors, whatever file layout or tool wrote them)."""
    return tensor_sha256(*(x for k in sorted(state) for x in (f"{k} {state[k].dtype} {list(state[k].shape)}", state[k])))


def tensor_sha256(*parts: Tensor | str) -> str:
    """Hex sha256 over ``parts`` in order: a string as its UTF-8 bytes, a tensor as its
    raw bytes in C order (native byte order: little-endian on every supported machine;
    for int32 codes, the bytes a safetensors file stores)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def training_only_keys(module: torch.nn.Module) -> set[str]:
    """State-dict keys that only training reads: each submodule's ``training_only_state`` (a VQ's
    EMA sums), which ``Tokenizer.save_pretrained(training_state=False)`` leaves out of a file."""
    return {f"{name}.{key}" if name else key for name, m in module.named_modules()
            for key in getattr(m, "training_only_state", ())}


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
                     digest: bool = False) -> None:
    """Write a safetensors file whose bytes depend only on its contents: the header's keys
    sorted (the ``safetensors`` package writes the metadata in a per-process hash order,
    so the same tokens gave different files from two processes), tensors in name order,
    little-endian, the header padded with spaces to 8 bytes. Any safetensors reader
    reads it. ``digest``: the metadata also records ``tensors_sha256`` (:func:`state_sha256`),
    which :func:`~tokenizers_vq.weights.load_weights_file` checks."""
    header: dict[str, object] = {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"save_safetensors: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        blob = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    if metadata or digest:
        metadata = {**(metadata or {}), **({"tensors_sha256": state_sha256(tensors)} if digest else {})}
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def shell_arg(path: str | os.PathLike) -> str:
    """``path`` quoted for a shell command that a message suggests; a relative name starting with
    ``-`` gets ``./`` in front, so the command does not take it for an option."""
    name = os.fspath(path)
    return shlex.quote("./" + name if name.startswith("-") else name)


def check_media_file(path: Path, what: str) -> None:
    """Refuse a missing or empty (0-byte) media file, naming it; ``what``: "audio", "image", "video"."""
    if not path.is_file():
        mode = path.stat().st_mode if path.exists() else 0
        kind = next((w for test, w in _SPECIAL if test(mode)), None)
        raise ValueError(f"{path} is {kind}, not a file: copy the {what} into a file first" if kind else
                         f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} file {path} is empty (0 bytes): a copy or download that did not finish; "
                         "copy it again")


def check_pixels(path: Path, w: int, h: int, max_pixels: int | None, what: str = "") -> None:
    """Refuse an image or video frame of more than ``max_pixels`` pixels (``None``: no limit)."""
    if max_pixels is not None and w * h > max_pixels:
        size = f"{w * h / 1e6:.1f} megapixels" if w * h >= 100_000 else f"{w * h} pixels"
        limit = f"{max_pixels / 1e6:.1f} megapixels" if max_pixels >= 100_000 else f"{max_pixels} pixels"
        raise ValueError(f"{path}{what} {'are' if what.endswith('s') else 'is'} {w}x{h} = {size}, over the limit of "
                         f"{limit} (memory grows with the pixel count); downscale it, or raise the "
                         f"limit with --max-pixels {w * h} (max_pixels= in Python)")
