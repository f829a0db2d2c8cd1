"""What an export folder was made from (``export.json``), so that a rerun resumes only
an export it would write identically.

:func:`fingerprint` describes a run: the model (id, config, a sha256 of its weights),
the inputs (path as given, bytes, mtime) and the export's own options. :func:`claim`
records it in a fresh folder before the first shard is written, lets a rerun with an
equal fingerprint resume, and refuses one that differs, naming each differing field,
unless asked to start over: then it sets the files an export writes (and only those)
aside, deleted once the new export is finished and put back if it fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenizers_vq.io import TEMPORARY_TAG, atomic_write, state_sha256, training_only_keys
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.tokenizer_config import TokenizerConfig
from tokenizers_vq.webdataset import TarSample

RECORD = "export.json"
START_OVER = ("pass overwrite=True (tvq export --overwrite) to start over (its shards, index files and manifest are "
              "replaced once the new export finishes), or export to another folder (--out)")


def written_by_export(name: str) -> bool:
    """Whether a file name is one an export writes: a shard's ``.bin``, ``.json`` or
    ``.layout.bin``, ``manifest.json``, ``export.json``, or the temporary file of an
    interrupted atomic write of one of them (``.<stem>.tvq-tmp-<8 characters><suffix>``)."""
    tmp = re.fullmatch(rf"\.(.+)\.{TEMPORARY_TAG}[a-z0-9_]{{8}}(\.[a-z]+)", name)
    if tmp:
        name = tmp[1] + tmp[2]
    return re.fullmatch(r"shard_\d{5,}(\.json|\.bin|\.layout\.bin)|manifest\.json|export\.json", name) is not None


def _input_entry(path: Path | TarSample) -> list[Any]:
    """``[path as given, bytes, mtime_ns]``; a folder of frames: its files' total bytes
    and the latest mtime among them; a tar sample: ``source::member``, the member's bytes
    and the archive's mtime (0 for a ``pipe:`` source)."""
    if isinstance(path, TarSample):
        local = Path(path.source)
        return [str(path), path.size, local.stat().st_mtime_ns if local.is_file() else 0]
    if not path.exists():
        raise ValueError(f"input not found: {path}")
    files = sorted(c for c in path.iterdir() if c.is_file()) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return [str(path), sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]


def weights_sha256(tok: Tokenizer, full: bool = False) -> str:
    """Hex sha256 over the state dict by name: each tensor's name, dtype, shape and bytes, less
    the state only training reads (``training_only_state``: a VQ's EMA sums, which a file saved
    without them rebuilds at load, so both copies of a model hash alike); ``full`` includes it
    (the hash older token files and exports hold)."""
    state, left_out = tok.state_dict(), set() if full else training_only_keys(tok)
    state = {k: v for k, v in state.items() if k not in left_out}
    return state_sha256(state)


def same_weights(recorded: str, tok: Tokenizer) -> bool:
    """Whether a recorded :func:`weights_sha256` names ``tok``'s weights, hashed either way
    (the full state's hash computed only when the first does not match)."""
    return recorded == weights_sha256(tok) or recorded == weights_sha256(tok, full=True)


def fingerprint(tok: Tokenizer, files: Sequence[Path], options: dict[str, Any]) -> dict[str, Any]:
    """What an export's files follow from, as ``export.json`` records it.

    Args:
        options: the export's settings that shape its files (format, items per
            shard, token dtype, layout), recorded as given.

    Returns:
        ``model_id``, ``model_config`` (the
        :class:`~tokenizers_vq.tokenizer.TokenizerConfig` as a dict),
        ``weights_sha256`` (:func:`weights_sha256`), the ``options``, and ``inputs``:
        ``[path as given, bytes, mtime_ns]`` per input in export order (a folder of
        frames: its files' total bytes and latest mtime). In JSON types, as read back.
    """
    fp = {"model_id": tok.config.name, "model_config": asdict(tok.config), "weights_sha256": weights_sha256(tok),
          **options, "inputs": [_input_entry(f if isinstance(f, TarSample) else Path(f)) for f in files]}
    return json.loads(json.dumps(fp))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field: old vs new`` per differing field (config fields dotted, e.g.
    ``model_config.backbone.channels``); the inputs by their count and first
    differing entry."""
    a, b = (_flat({k: v for k, v in d.items() if k != "inputs"}) for d in (old, new))

    def show(d: dict[str, Any], k: str) -> str:
        return json.dumps(d[k]) if k in d else '"fp32" (the default)' if k == "precision" else "(absent)"

    diffs = [f"{k}: {show(a, k)} vs {show(b, k)}" for k in dict.fromkeys([*a, *b])
             if k not in a or k not in b or a[k] != b[k]]
    x, y = old.get("inputs", []), new["inputs"]
    if x != y:
        i = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        first = [f"{e[i][0]} ({e[i][1]} bytes, mtime_ns {e[i][2]})" if i < len(e) else "(none)" for e in (x, y)]
        diffs.append(f"inputs: {len(x)} files vs {len(y)}, first difference at #{i}: {first[0]} vs {first[1]}")
    return diffs


def remove_export(out: Path) -> None:
    """Delete the files an export wrote in ``out`` (:func:`written_by_export`) and
    nothing else: ``manifest.json`` first, so that a removal cut short never leaves a
    finished-looking export, ``export.json`` last."""
    own = [p for p in out.iterdir() if p.is_file() and written_by_export(p.name)]
    rank = {"manifest.json": 0, RECORD: 2}
    for p in sorted(own, key=lambda p: rank.get(p.name, 1)):
        p.unlink()


REPLACED = ".replaced"
"""The folder, inside an export's, where ``overwrite`` keeps the export it replaces until the
new one is finished (:func:`set_aside`, :func:`bring_back`, :func:`drop_replaced`)."""


def _ours(path: Path) -> bool:
    """Whether ``path`` is absent, a JSON object in an export's format, or unreadable as JSON
    beside an export's shards or temporaries: not another tool's file (without ``"format": "tvq-shards/..."``)."""
    if not path.is_file():
        return True
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):  # damaged by a power loss beside an export's shards, to
        # be rewritten; with none, another tool's file that is not strict JSON (comments, JSON lines...)
        return any(written_by_export(p.name) and p.name not in ("manifest.json", RECORD) for p in path.parent.iterdir())
    return isinstance(data, dict) and isinstance(data.get("format"), str) and data["format"].startswith("tvq-shards/")


def set_aside(out: Path) -> None:
    """Move the files of an export in ``out`` into ``out/.replaced`` (``manifest.json``
    first). Where ``.replaced`` already exists, an earlier replacement was cut short: it
    holds the finished export, and the files in ``out`` are the unfinished one's, deleted."""
    keep = out / REPLACED
    if keep.is_dir():
        remove_export(out)
        return
    own = [p for p in out.iterdir() if p.is_file() and written_by_export(p.name)]
    if not own:
        return
    keep.mkdir()
    for p in sorted(own, key=lambda p: p.name != "manifest.json"):
        p.replace(keep / p.name)


def bring_back(out: Path) -> None:
    """Undo :func:`set_aside` after a replacement failed: the new run's files are deleted and
    the earlier export's moved back (``manifest.json`` last)."""
    keep = out / REPLACED
    if not keep.is_dir():
        return
    remove_export(out)
    for p in sorted(keep.iterdir(), key=lambda p: p.name == "manifest.json"):
        p.replace(out / p.name)
    keep.rmdir()


def drop_replaced(out: Path) -> None:
    """After an export finished: delete the export a replacement kept aside
    (:func:`set_aside`), if any, and the temporary files of writes cut short by a kill."""
    for p in out.iterdir():
        if p.name.startswith(".") and p.is_file() and written_by_export(p.name):
            p.unlink()
    keep = out / REPLACED
    if keep.is_dir():
        for p in keep.iterdir():
            p.unlink()
        keep.rmdir()


def _with_defaults(record: dict[str, Any]) -> dict[str, Any]:
    """A recorded fingerprint with its model config rebuilt, so that config fields added
    since it was written read as their defaults (an older export still resumes)."""
    try:
        config = asdict(TokenizerConfig.from_dict(record["model_config"]))
    except (KeyError, TypeError, ValueError):
        return record  # compared as it is: the differences name what does not match
    return {**record, "model_config": json.loads(json.dumps(config))}


UPRIGHT = "upright"
"""How an image or video export reads its inputs (``image_reader`` / ``video_reader`` in
``export.json``): an EXIF orientation or a display matrix applied. Exports recorded without
it read them as stored."""

IMAGE_READER = "upright, srgb, palettes"
"""How an image export reads photos: upright, colours in sRGB from an embedded profile (of
a palette image's too) and transparency (a colour key too) composited on white. Exports
recorded as ``UPRIGHT`` read colours as stored; as ``SRGB_READER``, palette images' colours."""

SRGB_READER = "upright, srgb"
"""The image reader before palette images' profiles were applied."""

_READERS = ("image_reader", "video_reader")


def _read_upright(old: dict[str, Any], fp: dict[str, Any]) -> dict[str, Any]:
    """``old`` as recorded, or, for an image or video export recorded before its inputs were
    read as this run reads them (upright; photos in sRGB), with the reader set as this run's
    (checked by :func:`_none_turned` and :func:`_none_recoloured`)."""
    key = next((k for k in _READERS if k in fp), None)
    if key is None or old.get(key) == fp[key]:
        return old
    if key in old and not (old[key] in (UPRIGHT, SRGB_READER) and fp[key] == IMAGE_READER):
        return old  # another reader: named among the differences
    return {**old, key: fp[key]}


def _none_recoloured(fp: dict[str, Any], palettes_only: bool = False) -> None:
    """Raise ``ValueError`` when a photo would read in other colours than an export begun
    before photos were read in sRGB read it (an embedded profile of another space, or a
    colour key; with ``palettes_only``, begun before palette images' profiles were applied:
    a palette image's profile of another space), or is a tar member (not looked into)."""
    from PIL import Image  # noqa: PLC0415

    from tokenizers_vq.image_io import recoloured  # noqa: PLC0415

    for entry in fp["inputs"]:
        path = Path(entry[0])
        try:
            with Image.open(path) as im:
                changed = recoloured(im) and (im.mode == "P" or not palettes_only)
        except OSError:
            changed = not path.is_file()  # an unreadable file is named by the reader
        if changed:
            raise ValueError(f"this export was begun reading {'palette ' * palettes_only}photos' colours as stored, "
                             f"and this version converts them to sRGB (or composites a transparent colour key); "
                             f"{entry[0]} reads otherwise now "
                             f"or could not be checked, so resuming would mix the two: {START_OVER}")


def _turned(path: Path, video: bool) -> bool:
    """Whether an input is turned by its EXIF orientation or display matrix; True for an
    input that is not a file (a tar member is not looked into)."""
    from PIL import Image  # noqa: PLC0415

    from tokenizers_vq.media import exif_turned, video_turned  # noqa: PLC0415

    if not path.is_file():
        return not path.is_dir()  # a folder of frames holds no orientation
    if video:
        return video_turned(path)
    try:
        with Image.open(path) as im:
            return exif_turned(im)
    except OSError:
        return False  # an unreadable file is named by the reader


def _none_turned(fp: dict[str, Any]) -> None:
    """Raise ``ValueError`` when an input is turned by an EXIF orientation or a display
    matrix (or is a tar member, which is not looked into): an export begun reading its inputs
    as stored holds them so in its finished shards, and would hold them upright in new ones."""
    video = "video_reader" in fp
    for entry in fp["inputs"]:
        if _turned(Path(entry[0]), video):
            what = "videos" if video else "photos"
            raise ValueError(f"this export was begun reading {what} as stored, and this version reads them upright "
                             f"(their {'display matrix' if video else 'EXIF orientation'} applied); {entry[0]} is "
                             f"turned or could not be checked, so resuming would mix the two: {START_OVER}")


def _same_weights(old: dict[str, Any], fp: dict[str, Any], tok: Tokenizer | None) -> dict[str, Any]:
    """``old`` with a weights hash recorded the earlier way (over ``tok``'s full state) read as
    this run's, when it names the same weights."""
    h = old.get("weights_sha256")
    if tok is not None and h not in (None, fp.get("weights_sha256")) and h == weights_sha256(tok, full=True):
        return {**old, "weights_sha256": fp.get("weights_sha256")}
    return old


def _records(record: Path, fp: dict[str, Any], tok: Tokenizer | None = None, upright: bool = False) -> bool:
    """Whether ``record`` (an ``export.json``) is readable and records ``fp`` (with ``upright``,
    also where it was recorded before its inputs were read as this run reads them)."""
    try:
        old = json.loads(record.read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(old, dict):
        return False
    old = _same_weights(old, fp, tok)
    return not differences(_with_defaults(_read_upright(old, fp) if upright else old), fp)


def claim(out: Path, fp: dict[str, Any], overwrite: bool, tok: Tokenizer | None = None) -> None:
    """Make ``out`` an export of ``fp``: record it in ``out/export.json`` (atomically),
    or resume when the one recorded there equals it. With ``overwrite``, an earlier
    export there is set aside (:func:`set_aside`), to be deleted once this one is finished;
    the same replacement run again after an interrupt resumes, and the set-aside export's own
    run (without ``overwrite``) puts it back instead, finished, dropping the unfinished one.
    ``tok``: the run's model, whose weights a record may hold hashed over its full state.

    Raises:
        ValueError: without ``overwrite``, the recorded fingerprint differs (each
            differing field named, recorded vs this run) or is unreadable, or ``out``
            holds export files but no ``export.json``; with or without it, ``out`` holds a ``manifest.json`` or
            ``export.json`` that is not an export's (another tool's files are never replaced).
    """
    record = out / RECORD
    foreign = [name for name in ("manifest.json", RECORD) if not _ours(out / name)]
    if foreign:
        raise ValueError(f"{out} holds {' and '.join(foreign)} that no export wrote (not JSON with \"format\": "
                         f"\"{fp['format']}\"): another tool's files, kept; export to another folder (--out), or "
                         "delete them if they are what remains of an export cut short there")
    if overwrite and (out / REPLACED).is_dir() and _records(record, fp, tok):
        return  # this very replacement, interrupted: it resumes; the export it replaces stays in .replaced
    if (not overwrite and (out / REPLACED / "manifest.json").is_file() and not _records(record, fp, tok)
            and _records(out / REPLACED / RECORD, fp, tok, upright=True)):
        # the finished export this run made, set aside by an --overwrite run that was cut short: asked for again,
        # it comes back (the unfinished replacement is dropped) and its record is checked below as a resume's
        bring_back(out)
    if overwrite:
        set_aside(out)
        try:
            atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(fp)))
        except OSError:
            bring_back(out)  # the earlier export stays as it was
            raise
        return
    if record.is_file():
        try:
            old = json.loads(record.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt {record}: {e}; {START_OVER}") from e
        if not isinstance(old, dict):
            raise ValueError(f"corrupt {record}: not a JSON object; {START_OVER}")
        upgraded = _read_upright(_same_weights(old, fp, tok), fp)
        diffs = differences(_with_defaults(upgraded), fp)
        if diffs:
            more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
            raise ValueError(f"{out} holds an export made differently (recorded vs this run): "
                             f"{'; '.join(diffs[:6])}{more}. Resuming would mix the two: {START_OVER}")
        if upgraded is not old:  # checked once: the record says so from now on
            if not any(k in old for k in _READERS):
                _none_turned(fp)
            if fp.get("image_reader") == IMAGE_READER:
                _none_recoloured(fp, palettes_only=old.get("image_reader") == SRGB_READER)
            atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(upgraded)))
        return
    found = sorted(p.name for p in out.iterdir() if written_by_export(p.name))
    if found:
        raise ValueError(f"{out} holds export files ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) "
                         f"but no {RECORD}, so what they were made from is unknown: {START_OVER}")
    atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(fp)))
