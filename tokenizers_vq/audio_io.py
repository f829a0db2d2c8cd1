"""Audio files in and out through ``soundfile`` (WAV, FLAC, OGG, ...), resampled by
:mod:`tokenizers_vq.resample` on the way in."""

from __future__ import annotations

import errno
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tokenizers_vq.errors import UNREADABLE
from tokenizers_vq.io import AUDIO_FORMATS, atomic_write, check_media_file, check_writable, shell_arg
from tokenizers_vq.resample import resample

MIN_SAMPLE_RATE = 1000
"""Lowest file sample rate :func:`load_audio` resamples from (telephone audio is 8 kHz)."""


def load_audio(path: str | os.PathLike, sample_rate: int | None = None, mono: bool = False) -> tuple[Tensor, int]:
    """Read an audio file as float32 ``(channels, T)``: integer samples scaled to [-1, 1], float
    samples as stored (they may pass 1); resampling may overshoot a full-scale edge a little.

    Args:
        sample_rate: resample to this rate (``None`` keeps the file's).
        mono: average the channels as they are read (``(1, T)``; a long multichannel file
            is never held whole, nor resampled channel by channel).

    Returns:
        ``(waveform, sample_rate)``.

    Raises:
        ValueError: missing, unreadable or truncated file, no samples, or (when
            resampling) a sample rate under :data:`MIN_SAMPLE_RATE`.
    """
    return read_audio(path, sample_rate, mono)[:2]


def _libsndfile_words(e: Exception) -> str:
    """libsndfile's own words for an error, without soundfile's "Error opening b'<name>': "
    (the name is given as bytes, so that names that are not UTF-8 open)."""
    return e.error_string if getattr(e, "code", 0) else str(e)


def read_audio(path: str | os.PathLike, sample_rate: int | None = None,
               mono: bool = False) -> tuple[Tensor, int, int, int]:
    """:func:`load_audio`'s ``(waveform, sample_rate)`` followed by the file's own sample
    rate and channel count."""
    import soundfile as sf  # noqa: PLC0415

    path = Path(path)
    check_media_file(path, "audio")
    try:
        with sf.SoundFile(os.fsencode(path)) as f:  # bytes: names that are not UTF-8, as Linux allows
            sr, channels, promised, fmt = f.samplerate, f.channels, f.frames, f.format
            block = max(1, 2**22 // channels)
            riff = fmt in _RIFF
            if sample_rate is not None and sr < MIN_SAMPLE_RATE:
                # resampling would multiply the length by sample_rate / sr: a 1 Hz header on
                # a 1 MB file asks for 10^10 samples
                raise ValueError(f"{path} claims a sample rate of {sr} Hz, under the {MIN_SAMPLE_RATE} Hz that any "
                                 "real recording has; its header is wrong: re-export it with its true rate")
            # in blocks until the data ends: one read would allocate the header's frame count,
            # which a truncated or forged file overstates (a FLAC may claim 2^36 samples)
            blocks, mix_energy, channel_energy = [], 0.0, np.zeros(channels)
            while len(data := f.read(block, dtype="float32", always_2d=True)):
                if mono and channels > 1:
                    mixed = data.mean(1, keepdims=True)
                    mix_energy += float(np.square(mixed, dtype=np.float64).sum())
                    channel_energy += np.square(data, dtype=np.float64).sum(0)
                    data = mixed
                blocks.append(data)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot read audio {path}: {_libsndfile_words(e)} {UNREADABLE}") from e
    got = sum(map(len, blocks))
    held = _mpeg_samples(path) if fmt == "MP3" else None
    if held is not None and got < held[0] - 3 * held[1]:  # a frame or two of encoder delay and padding
        # an MP3 without a frame-count header (as an encoder writes to a pipe): libsndfile stops
        # at a length it guessed from the first frame's bitrate
        raise ValueError(f"cannot read audio {path}: its MPEG frames hold {held[0]} samples, the decoder gave "
                         f"{got} (an MP3 without a frame-count header, as written to a pipe); convert it to "
                         "FLAC or WAV first (ffmpeg -i in.mp3 out.flac)")
    # a compressed file's header counts its samples (RIFF: checked below); an MP3 without a
    # frame-count header gets an estimate instead, which the count of its frames replaces
    promised = min(promised, held[0]) if held is not None else promised
    if not riff and got < 0.95 * promised - 2304:
        raise ValueError(f"cannot read audio {path}: the file is cut short (its header gives {promised} samples, "
                         f"{got} could be decoded); copy or export it again")
    cut = _pcm_cut_short(path)
    if cut is not None:
        raise ValueError(f"cannot read audio {path}: the file is cut short (its header promises {cut[0]} bytes of "
                         f"samples, {cut[1]} are there); copy or export it again")
    trouble = _ogg_trouble(path)
    if trouble is not None:
        raise ValueError(f"cannot read audio {path}: {trouble}")
    if not blocks:
        raise ValueError(f"audio file {path} has no samples: none could be decoded from its {path.stat().st_size} "
                         "bytes (an empty recording, or a file cut short: copy or export it again)")
    wav = torch.from_numpy(np.concatenate(blocks).T.copy())
    if not torch.isfinite(wav).all():
        raise ValueError(f"audio file {path} contains NaN or Inf samples (a damaged or wrongly converted file): "
                         f"export it again from its source, or replace them (e.g. numpy.nan_to_num) and save it anew")
    loudest = float(channel_energy.max()) if mono and channels > 1 else 0.0
    if loudest > 0 and mix_energy < loudest * MIX_QUIET ** 2:
        _warn_quiet_mix(path, channels, mix_energy, loudest)
    source_rate = sr
    if sample_rate is not None and sample_rate != sr:
        wav, sr = resample(wav, sr, sample_rate), sample_rate
    return wav, sr, source_rate, channels


MIX_QUIET = 0.25
"""A mono mix (the channels' mean) whose level is under this fraction of its loudest channel's
(-12 dB) is named in a warning: channels out of phase cancel, and sound in one channel of six
comes out at a sixth. Two channels of one voice mix at full level, a hard-panned one at half."""


def _warn_quiet_mix(path: Path, channels: int, mix_energy: float, loudest: float) -> None:
    db = -10 * math.log10(max(mix_energy, 1e-30) / loudest)
    how = "cancel out to silence" if db > 60 else f"are {db:.0f} dB quieter than its loudest channel"
    warnings.warn(f"{path}: its {channels} channels, mixed to mono by their mean, {how} (channels out of phase, "
                  f"or the sound in one channel of several); to code "
                  f"one channel, extract it first (ffmpeg -i {shell_arg(path.name)} -af 'pan=mono|c0=c0' "
                  f"{shell_arg(path.stem + '_mono.wav')}: c0 is the first channel)", stacklevel=3)


# RIFF-family containers, whose data length a writer to a pipe leaves open (see _pcm_cut_short)
_RIFF = ("WAV", "WAVEX", "RF64", "W64")
_W64_RIFF = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
_W64_WAVE, _W64_DATA = (name + b"\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a" for name in (b"wave", b"data"))


def _pcm_cut_short(path: Path) -> tuple[int, int] | None:
    """``(promised, present)`` bytes of samples in a RIFF/WAVE, RF64/BW64, Sony Wave64 or
    AIFF/AIFC file when fewer are present than its header gives (libsndfile reads what is there
    without a word); ``None`` for a whole file, another format, or a length left open (0, or 2 GiB
    and up in a 32-bit field, 2^62 and up in a 64-bit one: what writers to a pipe put there)."""
    with open(path, "rb") as f:
        head = f.read(40)
        kind = head[:4] + head[8:12]
        # the chunk that holds the samples, its id and size fields, the header bytes its size counts,
        # the bytes before the samples in it (AIFF: offset and block size), chunk padding, first chunk
        if kind in (b"RIFFWAVE", b"RF64WAVE", b"BW64WAVE"):
            name, id_len, size_len, order, counted, skip, pad, at = b"data", 4, 4, "little", 0, 0, 2, 12
        elif kind in (b"FORMAIFF", b"FORMAIFC"):
            name, id_len, size_len, order, counted, skip, pad, at = b"SSND", 4, 4, "big", 0, 8, 2, 12
        elif head[:16] == _W64_RIFF and head[24:40] == _W64_WAVE:
            name, id_len, size_len, order, counted, skip, pad, at = _W64_DATA, 16, 8, "little", 24, 0, 8, 40
        else:
            return None
        size, ds64 = path.stat().st_size, None
        f.seek(at)
        while len(chunk := f.read(id_len + size_len)) == id_len + size_len:
            length, at = int.from_bytes(chunk[id_len:], order) - counted, f.tell()
            if length < 0:
                return None  # a malformed chunk: the decoder's to judge
            if chunk[:id_len] == name:
                if length == 0xFFFFFFFF and ds64 is not None:  # RF64: the 64-bit length is in the ds64 chunk
                    length, size_len = ds64, 8
                # a stream's placeholder: 0xFFFFFFFF, SoX's 0x7ffff000, ffmpeg's 0 (AIFF) and 2^63 - 1 (Wave64)
                open_length = length == 0 or length >= (0x7FFF0000 if size_len == 4 else 1 << 62)
                length, present = length - skip, max(0, size - at - skip)
                return (length, present) if not open_length and present < length else None
            if chunk[:id_len] == b"ds64":  # after the 64-bit RIFF size: the data size
                ds64 = int.from_bytes(f.read(16)[8:], "little")
            f.seek(at + length + -length % pad)
    return None


_MPEG_KBPS = {  # bitrate index 1-14 by (MPEG-1?, layer)
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_KBPS[False, 3] = _MPEG_KBPS[False, 2]


def _mpeg_frame(data: bytes, at: int) -> tuple[int, int] | None:
    """``(bytes, samples)`` of the MPEG audio frame whose header starts at ``at``, or ``None``
    where no valid header is there (free-format frames included: their size is not stated)."""
    if at + 4 > len(data):
        return None
    h = int.from_bytes(data[at : at + 4], "big")
    version, layer, rate_i, freq_i = (h >> 19) & 3, 4 - ((h >> 17) & 3), (h >> 12) & 15, (h >> 10) & 3
    if (h >> 21) != 0x7FF or version == 1 or layer == 4 or rate_i in (0, 15) or freq_i == 3:
        return None
    mpeg1 = version == 3
    hz = (44100, 48000, 32000)[freq_i] >> (0 if mpeg1 else 1 if version == 2 else 2)
    kbps, pad = _MPEG_KBPS[mpeg1, layer][rate_i - 1], (h >> 9) & 1
    if layer == 1:
        return (12000 * kbps // hz + pad) * 4, 384
    per_frame = 576 if layer == 3 and not mpeg1 else 1152
    return (per_frame // 8) * 1000 * kbps // hz + pad, per_frame


def _mpeg_samples(path: Path) -> tuple[int, int] | None:
    """``(samples, samples per frame)`` that an MP3's frames hold, from walking their
    headers, or ``None`` where no frame header is found or the first frame is a frame-count
    header (Xing, Info, VBRI: the decoder then knows the length, and the header's delay and
    padding trim it). ID3v2 tags (with a footer, or several) are skipped, and bytes that are
    not a frame (padding, junk, trailing ID3v1 or APE tags) are passed over to the next
    header that another frame follows, as decoders resync; a frame cut by the end of the
    file is not counted."""
    data = path.read_bytes()
    at = 0
    while data[at : at + 3] == b"ID3" and at + 10 <= len(data):  # a syncsafe size after the 10-byte header
        size = sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[at + 6 : at + 10]))
        at += 10 + size + (10 if data[at + 5] & 0x10 else 0)
    samples, first = 0, None
    while at + 4 <= len(data):
        frame = _mpeg_frame(data, at)
        if frame is None:  # resync: the next header that another frame (or the end) follows
            at = data.find(b"\xff", at + 1)
            while at != -1:
                nxt = _mpeg_frame(data, at)
                if nxt is not None and (at + nxt[0] == len(data) or _mpeg_frame(data, at + nxt[0]) is not None):
                    break
                at = data.find(b"\xff", at + 1)
            if at == -1:
                break
            continue
        if at + frame[0] > len(data):
            break  # the last frame is cut
        if first is None:
            if any(tag in data[at : at + min(frame[0], 64)] for tag in (b"Xing", b"Info", b"VBRI")):
                return None
            first = frame[1]
        samples, at = samples + frame[1], at + frame[0]
    return (samples, first) if first is not None else None


def _ogg_trouble(path: Path) -> str | None:
    """What libsndfile passes over without a word in an Ogg file (Vorbis, Opus, FLAC in Ogg): a
    last page that runs past the end of the file (it reads the pages before: an Ogg stream
    states no total length), or a second stream chained after the first (``cat a.ogg b.ogg``, a
    radio recording: it reads the first only); ``None`` for a whole single-stream file or
    another format."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        at, data_seen = 0, False
        while at < size:
            f.seek(at)
            head = f.read(27)
            if len(head) < 27 or head[:4] != b"OggS":
                return None  # not Ogg (or bytes after its pages: the decoder's to judge)
            if head[5] & 2 and data_seen:  # streams side by side all begin on the first pages
                return (f"a second stream is chained after the first at byte {at} (files joined end to end, or a "
                        "radio recording), and only the first could be read; decode them into one file first "
                        f"(ffmpeg -i {shell_arg(path.name)} {shell_arg(path.stem + '_joined.wav')})")
            data_seen |= not head[5] & 2
            table = f.read(head[26])
            end = at + 27 + head[26] + sum(table)
            if len(table) < head[26] or end > size:
                return (f"the file is cut short (its last page would end at byte {end}, the file has {size}); "
                        "copy or export it again")
            at = end
    return None


OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
"""The sample rates an Opus stream codes; audio at another rate is written to ``.opus`` at 48 kHz."""


def _room(path: str) -> float:
    """Free bytes on the file system of ``path`` (infinite where that cannot be told)."""
    try:
        return shutil.disk_usage(os.path.dirname(path) or ".").free
    except OSError:
        return math.inf


def save_audio(wav: Tensor, path: str | os.PathLike, sample_rate: int) -> Path:
    """Write ``(channels, T)`` or ``(T,)`` float audio atomically (format by suffix;
    16-bit PCM for WAV/FLAC; Opus at 48 kHz where it does not code ``sample_rate``), clipping
    to [-1, 1]."""
    import soundfile as sf  # noqa: PLC0415

    if wav.ndim == 1:
        wav = wav.unsqueeze(0)
    if wav.ndim != 2 or wav.shape[-1] == 0:
        raise ValueError(f"save_audio expects (channels, T) with T > 0, got shape {tuple(wav.shape)}")
    check_writable("audio", path)
    data = wav.detach().float().clamp(-1, 1).t().cpu().numpy()
    suffix = Path(path).suffix.lower()
    fmt, subtype = AUDIO_FORMATS.get(suffix, (None, "PCM_16" if suffix in (".wav", ".flac") else None))
    if subtype == "OPUS" and sample_rate not in OPUS_RATES:  # Opus codes these rates only: its own, 48 kHz
        data = resample(torch.from_numpy(data).t(), sample_rate, 48000).clamp(-1, 1).t().numpy()
        sample_rate = 48000

    def write(tmp: str) -> None:
        try:
            sf.write(os.fsencode(tmp), data, sample_rate, subtype=subtype, format=fmt)
            info = sf.info(os.fsencode(tmp))
        except RuntimeError as e:  # libsndfile's errors: a full disk is its "System error."
            if "System error" in str(e) and _room(tmp) < 4 * data.size:  # less room than the fp32 samples take
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e
            raise OSError(errno.EIO, _libsndfile_words(e)) from e
        if info.samplerate != sample_rate or info.frames != data.shape[0]:  # a format of fixed rates (.wve, .xi)
            raise ValueError(f"cannot write {path}: its format ({info.format}) does not keep {sample_rate} Hz audio "
                             f"(it stores {info.samplerate} Hz, {info.frames} samples of {data.shape[0]}); "
                             "name it .wav, .flac or .ogg")

    return atomic_write(path, write)
