"""Classical codecs at a tokenizer's own bitrate, measured like the tokenizer.

For the files ``tvq eval`` measures, each file is encoded and decoded by real encoders
and scored with :func:`eval.evaluate.item_metrics`, so a report can put them beside
the tokenizer:

- speech: Codec2 (``c2enc``/``c2dec``, 8 kHz 16-bit mono) at the mode nearest the
  tokenizer's kbps, and Opus (``ffmpeg``'s libopus, 16 kHz, VoIP mode) at 6 kbps,
  its lowest practical rate; metrics at the model's sample rate.
- video: H.264 and H.265 (``ffmpeg``'s libx264 / libx265, yuv420p) within the
  tokenizer's bits for the clip: the best constant quality (CRF) that fits, so the
  achieved rate lands just under the tokenizer's kbps where the encoder can go that low.
- images: JPEG and WebP (Pillow) at the highest quality whose file fits the
  tokenizer's bits, directly and after a Lanczos downscale by 2 and 4 (upscaled back
  with Lanczos after decoding).

Bits counted: the Codec2 bitstream at its nominal bits per frame (``c2enc`` pads
each frame to whole bytes), the Opus packets (the Ogg container not counted), the
whole H.264/H.265 Annex B stream (parameter sets included, the encoder's version SEI
removed), the whole JPEG/WebP file. A codec whose binary is absent is skipped with the reason.
Codec2 and Opus work on files in a temporary directory, video goes through pipes, images memory.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokenizers_vq.eval.evaluate import item_metrics
from tokenizers_vq.lpips import LPIPSNet
from tokenizers_vq.modality import Modality
from tokenizers_vq.resample import resample
from tokenizers_vq.tokenizer import Tokenizer

CODEC2_MODES = {"3200": (64, 0.02, 160), "2400": (48, 0.02, 160), "1600": (64, 0.04, 160), "1400": (56, 0.04, 160),
                "1300": (52, 0.04, 160), "1200": (48, 0.04, 160), "700C": (28, 0.04, 240), "450": (18, 0.04, 240)}
"""Codec2 mode -> (bits per frame, seconds per frame, delay in 8 kHz samples). The
rate is bits over seconds. The delay is the codec's fixed lag from input to
``c2dec`` output (20 ms, 30 ms for 700C and 450), measured as the lag that maximises
STOI over LibriSpeech utterances; it is removed so the metrics compare aligned
waveforms, as for the tokenizer."""
IMAGE_FACTORS = (1, 2, 4)
"""Downscale factors of the image baselines (1: the codec on the full image)."""


def _run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    """Run a binary and return its stdout; ``RuntimeError`` with its stderr's end on failure."""
    proc = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-400:]}")
    return proc.stdout


def _pcm16(wav: Tensor) -> bytes:
    return (wav.float().clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()


def _from_pcm16(data: bytes) -> Tensor:
    """Samples of 16-bit little-endian PCM as float ``(T,)`` in [-1, 1)."""
    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768)


def _fit(wav: Tensor, length: int) -> Tensor:
    """``(T,)`` cut or zero-padded at the end to ``(length,)``."""
    return torch.nn.functional.pad(wav[:length], (0, max(0, length - wav.shape[-1])))


def codec2_modes() -> list[str]:
    """The modes of :data:`CODEC2_MODES` that the installed ``c2enc`` lists (all of
    them when it is absent or its usage line cannot be read)."""
    found = None
    if shutil.which("c2enc"):
        proc = subprocess.run(["c2enc"], capture_output=True, check=False)
        found = re.search(r"c2enc\s+([\w|]+)\s", (proc.stdout + proc.stderr).decode(errors="replace"))
    listed = set(found[1].split("|")) if found else set(CODEC2_MODES)
    return [m for m in CODEC2_MODES if m in listed] or list(CODEC2_MODES)


def nearest_codec2_mode(kbps: float, modes: list[str] | None = None) -> str:
    """The Codec2 mode whose rate is nearest ``kbps`` in ratio (log rate)."""
    rate = {m: bits / secs / 1000 for m, (bits, secs, _) in CODEC2_MODES.items()}
    return min(modes or list(CODEC2_MODES), key=lambda m: abs(math.log(rate[m] / max(kbps, 1e-6))))


def codec2(wav: Tensor, sample_rate: int, mode: str) -> tuple[Tensor, float]:
    """Codec2 round trip of mono ``(T,)`` at ``sample_rate`` (resampled to 8 kHz for the
    codec and back, the decoder's delay removed). Returns ``(reconstruction (T,), bits)``."""
    bits_per_frame, seconds, delay = CODEC2_MODES[mode]
    with tempfile.TemporaryDirectory(prefix="tvq_codec2_") as tmp:
        raw, bit, out = (str(Path(tmp) / n) for n in ("in.raw", "out.bit", "out.raw"))
        low = resample(wav.float(), sample_rate, 8000)  # padded by the lag and a frame (c2enc drops a last partial
        n = low.shape[-1]  # frame): the whole clip is coded and its bits counted; at least two frames
        low = torch.nn.functional.pad(low, (0, max(2 * delay + 640, n + delay + math.ceil(seconds * 8000)) - n))
        Path(raw).write_bytes(_pcm16(low))
        _run(["c2enc", mode, raw, bit])
        _run(["c2dec", mode, bit, out])
        frames, data = Path(bit).stat().st_size // math.ceil(bits_per_frame / 8), Path(out).read_bytes()
    rec = resample(_from_pcm16(data[2 * delay:]), 8000, sample_rate)
    return _fit(rec, wav.shape[-1]), frames * bits_per_frame


def opus(wav: Tensor, sample_rate: int, kbps: float = 6.0) -> tuple[Tensor, float]:
    """Opus (libopus, VoIP mode, 16 kHz) round trip of mono ``(T,)`` at ``sample_rate``.
    Returns ``(reconstruction (T,), bits of the Opus packets)``."""
    with tempfile.TemporaryDirectory(prefix="tvq_opus_") as tmp:
        ogg = str(Path(tmp) / "out.ogg")
        pcm = _pcm16(resample(wav.float(), sample_rate, 16000))
        _run(["ffmpeg", "-v", "error", "-y", "-f", "s16le", "-ar", "16000", "-ac", "1", "-i", "-", "-c:a", "libopus",
              "-application", "voip", "-b:a", str(round(kbps * 1000)), ogg], pcm)
        sizes = _run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "packet=size",
                      "-of", "csv=p=0", ogg])
        pcm = _run(["ffmpeg", "-v", "error", "-i", ogg, "-f", "s16le", "-ar", "16000", "-ac", "1", "-"])
    bits = 8.0 * sum(int(line.split(b",")[0]) for line in sizes.split())
    return _fit(resample(_from_pcm16(pcm), 16000, sample_rate), wav.shape[-1]), bits


VIDEO_ENCODERS = {"h264": ("libx264", "h264", [], "6"),
                  "h265": ("libx265", "hevc", ["-x265-params", "log-level=error:info=0"], "39|40")}
"""Baseline name -> (ffmpeg encoder, Annex B muxer, extra options, SEI NAL unit types removed)."""
MAX_CRF = 51.0
"""The largest (lowest-quality) CRF of libx264 and libx265 in 8-bit."""


def video_codec(frames: Tensor, fps: float, name: str, kbps: float, steps: int = 6) -> tuple[Tensor, float, float]:
    """H.264 / H.265 round trip of ``(T, 3, H, W)`` frames in [0, 1] within ``kbps``.

    The encoder runs at constant quality (CRF, default preset, yuv420p); the CRF is the
    lowest (best quality) whose stream fits the clip's bits, searched from CRF 51 down
    by interpolating log-size between encodes (at most ``steps`` more, stopping once
    within 90-100 % of the bits), so the stream lands just under the target as a
    two-pass encode at a file size would aim to; when even CRF 51 does not fit, CRF 51.
    (One-pass ABR misses such low targets on short clips by a factor of 2 either way.)
    Odd sizes are edge-padded to even for yuv420p and cropped after decoding.

    Returns:
        ``(reconstruction (T, 3, H, W), bits of the stream, CRF)``.
    """
    encoder, muxer, extra, sei = VIDEO_ENCODERS[name]
    t, _, h, w = frames.shape
    arr = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    side = 16 if name == "h265" else 2  # x265 takes frames of 16 pixels a side or more; yuv420p even sides
    arr = np.pad(arr, ((0, 0), (0, max(side - h, h % 2)), (0, max(side - w, w % 2)), (0, 0)), mode="edge")
    budget = kbps * 1000 * t / fps

    def encode(crf: float) -> bytes:
        return _run(["ffmpeg", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                     f"{arr.shape[2]}x{arr.shape[1]}", "-r", str(Fraction(fps).limit_denominator(1001)), "-i", "-",
                     "-c:v", encoder, "-crf", f"{crf:.2f}", "-pix_fmt", "yuv420p", *extra,
                     "-bsf:v", f"filter_units=remove_types={sei}", "-f", muxer, "-"], arr.tobytes())

    stream, crf = encode(MAX_CRF), MAX_CRF
    over: tuple[float, float] | None = None  # (CRF, bits) of the best-quality encode over the budget
    for _ in range(steps if len(stream) * 8 <= budget else 0):
        if len(stream) * 8 >= 0.9 * budget:
            break
        aim, fit = math.log2(0.95 * budget), math.log2(len(stream) * 8)
        if over is None:  # the stream roughly doubles for every 6 CRF less
            guess = crf - 6 * (aim - fit)
        else:  # interpolate log-size between the two encodes that bracket the budget
            guess = crf + (over[0] - crf) * (aim - fit) / (math.log2(over[1]) - fit)
        lo = over[0] if over else 0.0
        guess = min(max(guess, lo + 0.25), crf - 0.25)
        if guess <= lo:
            break
        trial = encode(guess)
        if len(trial) * 8 <= budget:
            stream, crf = trial, guess
        else:
            over = (guess, len(trial) * 8.0)
    raw = _run(["ffmpeg", "-v", "error", "-f", muxer, "-i", "-", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], stream)
    dec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, *arr.shape[1:])
    if dec.shape[0] != t:
        raise RuntimeError(f"{encoder} round trip gave {dec.shape[0]} frames, expected {t}")
    return torch.from_numpy(dec[:, :h, :w].copy()).permute(0, 3, 1, 2).float() / 255, len(stream) * 8.0, crf


IMAGE_FORMATS = {"jpeg": ("JPEG", (1, 100), {"optimize": True}), "webp": ("WEBP", (0, 100), {"method": 6})}
"""Baseline name -> (Pillow format, quality range, save options)."""


def image_codec(img: Tensor, name: str, max_bits: float, factor: int = 1) -> tuple[Tensor, float, int]:
    """JPEG / WebP round trip of ``(3, H, W)`` in [0, 1] within ``max_bits``.

    With ``factor > 1`` the image is Lanczos-downscaled by ``factor`` before encoding and
    the decoded one upscaled back to ``(H, W)``. The quality is the highest whose file
    fits ``max_bits`` (binary search); the lowest when none fits.

    Returns:
        ``(reconstruction (3, H, W), bits of the file, quality)``.
    """
    from PIL import Image  # noqa: PLC0415

    fmt, (lo, hi), options = IMAGE_FORMATS[name]
    full = Image.fromarray((img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")
    small = full.resize((max(1, round(full.width / factor)), max(1, round(full.height / factor))), Image.LANCZOS) \
        if factor > 1 else full

    def encode(q: int) -> bytes:
        buf = io.BytesIO()
        try:
            small.save(buf, fmt, quality=q, **options)
        except (ValueError, OSError) as e:  # e.g. WebP's 16383-pixel side limit
            raise RuntimeError(f"{fmt} cannot encode a {small.width}x{small.height} image: {e}") from e
        return buf.getvalue()

    data, quality = encode(lo), lo
    a, b = lo + 1, hi
    while len(data) * 8 <= max_bits and a <= b:  # the largest quality that fits
        mid = (a + b) // 2
        trial = encode(mid)
        if len(trial) * 8 <= max_bits:
            data, quality, a = trial, mid, mid + 1
        else:
            b = mid - 1
    with Image.open(io.BytesIO(data)) as im:
        rec = im.convert("RGB")
    if factor > 1:
        rec = rec.resize(full.size, Image.LANCZOS)
    return torch.from_numpy(np.asarray(rec).copy()).permute(2, 0, 1).float() / 255, len(data) * 8.0, quality


def _ffmpeg_lacks(encoder: str) -> str | None:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, check=False).stdout
    if re.search(rf"\s{encoder}\s", out.decode(errors="replace")):
        return None
    return f"skipped: this ffmpeg has no {encoder} encoder; apt-get install ffmpeg"


def _pillow_lacks(fmt: str) -> str | None:
    from PIL import features  # noqa: PLC0415

    if features.check({"JPEG": "jpg", "WEBP": "webp"}[fmt]):
        return None
    return f"skipped: Pillow was built without {fmt}; pip install --force-reinstall pillow"


@dataclass(frozen=True)
class Baseline:
    """One classical codec applied item by item.

    Attributes:
        name: its key in metrics.json and the report (``codec2_1200``, ``h265``, ``webp_down2``, ...).
        code: ``(ref, rate, bits) -> (reconstruction, bits used, settings)``: ``ref`` and the
            reconstruction are the item as :meth:`~tokenizers_vq.modality.Modality.load_reference` gives it, ``rate`` its sample
            rate or frame rate, ``bits`` the tokenizer's bits for it.
        needs: binaries that must be on ``PATH``, each with the Debian package holding it.
        check: a reason it cannot run beyond missing binaries (``None``: it can).
    """

    name: str
    code: Callable[[Tensor, float, float], tuple[Tensor, float, dict[str, Any]]]
    needs: dict[str, str] = field(default_factory=dict)
    check: Callable[[], str | None] = lambda: None

    def unavailable(self) -> str | None:
        """Why this baseline cannot run here, or ``None``."""
        for binary, package in self.needs.items():
            if shutil.which(binary) is None:
                return f"skipped: {binary} not found; apt-get install {package}"
        return self.check()


def _audio_baselines(kbps: float | None) -> list[Baseline]:
    mode = nearest_codec2_mode(kbps or 0.0, codec2_modes())
    return [Baseline(f"codec2_{mode}", lambda x, sr, _b: (*codec2(x, int(sr), mode), {}),
                     {"c2enc": "codec2", "c2dec": "codec2"}),
            Baseline("opus_6k", lambda x, sr, _b: (*opus(x, int(sr), 6.0), {}), {"ffmpeg": "ffmpeg", "ffprobe": "ffmpeg"},
                     lambda: _ffmpeg_lacks("libopus"))]


def _video_baselines(kbps: float | None) -> list[Baseline]:
    def video(name: str) -> Baseline:
        def code(x: Tensor, fps: float, bits: float) -> tuple[Tensor, float, dict[str, Any]]:
            rec, used, crf = video_codec(x, fps, name, bits / (x.shape[0] / fps) / 1000)
            return rec, used, {"crf": crf}
        return Baseline(name, code, {"ffmpeg": "ffmpeg"}, lambda: _ffmpeg_lacks(VIDEO_ENCODERS[name][0]))
    return [video("h264"), video("h265")]


def _image_baselines(kbps: float | None) -> list[Baseline]:
    def image(name: str, factor: int) -> Baseline:
        def code(x: Tensor, _rate: float, bits: float) -> tuple[Tensor, float, dict[str, Any]]:
            rec, used, quality = image_codec(x, name, bits, factor)
            return rec, used, {"quality": quality}
        return Baseline(name + (f"_down{factor}" if factor > 1 else ""), code,
                        check=lambda: _pillow_lacks(IMAGE_FORMATS[name][0]))
    return [image(n, f) for n in IMAGE_FORMATS for f in IMAGE_FACTORS]


_BASELINES = {"audio": _audio_baselines, "video": _video_baselines, "image": _image_baselines}


def baselines_for(modality: str, kbps: float | None = None) -> list[Baseline]:
    """The baselines of a modality; ``kbps`` (audio) is the tokenizer's rate, which picks the Codec2 mode."""
    if modality not in _BASELINES:
        raise ValueError(f"unknown modality {modality!r} ({', '.join(_BASELINES)})")
    return _BASELINES[modality](kbps)


def _units(media: Modality, ref: Tensor, rate: float) -> dict[str, float]:
    """Seconds and/or pixels of one item (as :meth:`~tokenizers_vq.modality.Modality.load_reference` gives it)."""
    return {k: v for k, v in (("seconds", media.seconds(ref, rate)), ("pixels", media.pixels(ref))) if v}


def _rates(bits: float, units: dict[str, float]) -> dict[str, float]:
    out = {}
    if "seconds" in units:
        out["kbps"] = bits / units["seconds"] / 1000
    if "pixels" in units:
        out["bits_per_pixel"] = bits / units["pixels"]
    return out


def run_baselines(tok: Tokenizer, files: list[Path], items: list[dict[str, Any]], max_frames: int | None = 33,
                  lpips: LPIPSNet | None = None) -> dict[str, Any]:
    """Run every baseline of the tokenizer's modality on ``files``.

    Args:
        items: the tokenizer's items from :func:`eval.evaluate.evaluate` on the same
            files, in order; their ``tokens`` times ``log2(codebook_size)`` are the
            per-item bit budgets.
        max_frames: video frames read per file (as ``evaluate``).
        lpips: adds ``lpips`` to every item, as for the tokenizer.

    Returns:
        ``{"target": rates, "codecs": {name: {"summary": ..., "items": [...]}}, "skipped":
        {name: reason}}``. Rates are ``kbps`` (audio, video) and ``bits_per_pixel``
        (image, video) over all items (total bits / total seconds or pixels); ``target``
        holds the tokenizer's. Each codec's summary has the mean of every metric, its
        achieved rates and ``over_budget``, the number of items where it used more bits
        than the tokenizer; each item its file, bits, rates, settings and metrics. A codec
        that refused some files (not all) keeps the others: its entry also holds ``failed``
        (``"file: reason"`` each) and ``tokenizer``, the tokenizer's means and rates over the
        files it did code, which its comparison uses; one that refused every file is skipped.
    """
    bits_per_token = math.log2(tok.quantizer.codebook_size)
    target = 0.0
    total: dict[str, float] = {}
    kbps = tok.tokens_per_unit() * bits_per_token / 1000 if tok.modality == "audio" else None
    codecs = baselines_for(tok.modality, kbps)
    skipped = {b.name: reason for b in codecs if (reason := b.unavailable()) is not None}
    rows: dict[str, list[dict[str, Any]]] = {b.name: [] for b in codecs if b.name not in skipped}
    metric_keys: dict[str, None] = {}  # every item's, in order (an item's notes are its own)
    failed: dict[str, list[str]] = {}
    coded: dict[str, list[int]] = {name: [] for name in rows}  # each codec's files, by position
    per_file: list[tuple[dict[str, Any], float, dict[str, float]]] = []  # the tokenizer's item, bits, units
    for i, (f, item) in enumerate(zip(files, items)):
        ref, rate = tok.media.load_reference(f, tok.sample_rate, max_frames)
        budget, units = item["tokens"] * bits_per_token, _units(tok.media, ref, rate)
        per_file.append((item, budget, units))
        target += budget
        total = {k: total.get(k, 0.0) + v for k, v in units.items()}
        for b in codecs:
            if b.name not in rows:
                continue
            try:
                rec, used, settings = b.code(ref, rate, budget)
            except (RuntimeError, ValueError, OSError) as e:  # the codec's refusal of this file, said of it
                failed.setdefault(b.name, []).append(f"{item['file']}: {e}")
                continue
            pair = (ref, rec) if tok.media.has_pixels else (ref[None], rec[None])  # media space: (1, T) audio
            m = item_metrics(tok, *pair, lpips)
            metric_keys.update(dict.fromkeys(m))
            rows[b.name].append({"file": item["file"], "bits": used, **_rates(used, units), "over_budget": used > budget,
                                 **settings, **m})
            coded[b.name].append(i)
    out: dict[str, Any] = {"target": _rates(target, total), "codecs": {}, "skipped": skipped}
    for name, its in rows.items():
        if not its:  # (no files at all: nothing to say)
            skipped.update({name: f"failed on every file, e.g. {failed[name][0]}"} if name in failed else {})
            continue
        mine = [per_file[i] for i in coded[name]]
        units = {k: sum(u[k] for _, _, u in mine) for k in total} if name in failed else total
        out["codecs"][name] = {"summary": {**_means(its, metric_keys), **_rates(sum(it["bits"] for it in its), units),
                                           "over_budget": sum(it["over_budget"] for it in its), "items": len(its)},
                               "items": its}
        if name in failed:
            out["codecs"][name].update(failed=failed[name], tokenizer={
                **_means([it for it, _, _ in mine], metric_keys), **_rates(sum(b for _, b, _ in mine), units)})
    return out


def _means(items: list[dict[str, Any]], keys: dict[str, None]) -> dict[str, float | None]:
    """The mean of each metric in ``keys`` over the items that have a number for it."""
    vals = {k: [it[k] for it in items if isinstance(it.get(k), float)] for k in keys if not k.endswith("_note")}
    return {k: sum(v) / len(v) if v else None for k, v in vals.items()}
