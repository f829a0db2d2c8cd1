"""Tokenizer = encoder + quantizer + decoder, for images, audio or video.

Model-space tensors: images ``(B, C, H, W)`` and video ``(B, C, T, H, W)`` in
[-1, 1]; audio ``(B, 1, T)`` waveforms at ``sample_rate``. Codes are
``(B, *grid, *code_shape)``: ``grid`` is ``(h, w)``, ``(frames,)`` or
``(t, h, w)``; a dynamic-length model (``QuantizerConfig.dynamic``, images and audio)
codes each item into a variable number of tokens, :class:`PackedCodes`. A model
rebuilds from its own directory (``config.json`` + ``model.safetensors``); nothing is
pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tokenizers_vq import deferred
from tokenizers_vq.backbones import BACKBONES
from tokenizers_vq.errors import named_path, not_a_float_tensor
from tokenizers_vq.io import atomic_write_all, device_named, save_safetensors, training_only_keys
from tokenizers_vq.modality import Modality, names as modality_names
from tokenizers_vq.modality import get as get_modality
from tokenizers_vq.quantizers import DynamicQuantizer, PackedCodes
from tokenizers_vq.quantizers.base import evaluating
from tokenizers_vq.streaming import AudioDecodeStream, AudioEncodeStream, receptive_field
from tokenizers_vq.tokenizer_config import (QUANTIZER_KINDS, QuantizerConfig, TokenizerConfig,  # noqa: F401 (re-exported)
                                            architecture_metadata, backbone_config, check_architecture, saved_config)
from tokenizers_vq.weights import load_weights_file

_ASSETS = Path(__file__).parent / "assets"
PRETRAINED: dict[str, Path] = {
    "image": _ASSETS / "image_f16",
    "speech": _ASSETS / "speech_16k",
    "speech-rvq": _ASSETS / "speech_16k_rvq",
    "video": _ASSETS / "video_4x8x8",
}
"""The embedded models by name (cards in ``model_cards/``): each modality's default, and ``speech-rvq`` (3.2 kbps)."""
DEFAULT_FOR_MODALITY = {name: get_modality(name).default_model for name in modality_names()}
"""The embedded model that ``tvq`` picks for each modality of input when no model is given."""
DEFAULT_MODEL = PRETRAINED["image"]


@dataclass
class TokenizerOutput:
    """``forward``'s result: reconstruction (input's shape), codes, named losses (weighted) and metrics."""

    reconstruction: Tensor
    codes: Tensor
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor]


class Tokenizer(nn.Module):
    """Media tokenizer. See the module docstring for layouts.

    Example:
        >>> tok = Tokenizer(TokenizerConfig("image", {"channels": 16, "channel_mult": [1, 2], "latent_dim": 8}))
        >>> codes = tok.encode(torch.rand(1, 3, 30, 41) * 2 - 1)
        >>> codes.shape  # ceil(30/2) x ceil(41/2)
        torch.Size([1, 15, 21])
        >>> tok.decode(codes, size=(30, 41)).shape
        torch.Size([1, 3, 30, 41])

        A dynamic-length bottleneck codes each item into :class:`PackedCodes`:

        >>> q = QuantizerConfig("vq", {"codebook_size": 64}, dynamic={"target_fine_ratio": 0.25})
        >>> dyn = Tokenizer(TokenizerConfig("image", {"channels": 16, "channel_mult": [1, 2], "latent_dim": 8}, q))
        >>> packed = dyn.encode(torch.rand(1, 3, 30, 41) * 2 - 1)
        >>> packed.shape  # the latent of 32 x 44 pixels: padded to twice the stride
        (16, 22)
        >>> dyn.decode(packed, size=(30, 41)).shape
        torch.Size([1, 3, 30, 41])
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        if config.modality not in BACKBONES:
            raise ValueError(f"unknown modality {config.modality!r}; choose from {sorted(BACKBONES)}")
        self.config = config
        cfg_cls, enc_cls, dec_cls = BACKBONES[config.modality]
        self.backbone_config = backbone_config(cfg_cls, config.backbone)
        self.encoder = enc_cls(self.backbone_config)
        self.decoder = dec_cls(self.backbone_config)
        self.quantizer = config.quantizer.build(self.backbone_config.latent_dim)
        config.check_clips(getattr(self.backbone_config, "temporal_factor", None))
        self._check_dynamic()  # (before any training: a built model must be able to code)
        if get_modality(config.modality).streams and not getattr(self.quantizer, "positionwise", True):
            raise ValueError(f"{type(self.quantizer).__name__} quantizes latent frames with their neighbours, but long "
                             "audio is coded in overlapping chunks and streams frame by frame: use a position-wise "
                             "quantizer (vq, fsq, lfq, simvq, ibq, ... with levels/groups) for audio")
        if getattr(self.backbone_config, "causal", False):  # chunked offline coding then equals a stream's
            needed = max(-(-receptive_field(self.encoder) // self.backbone_config.hop), receptive_field(self.decoder))
            if config.chunk_context < needed:
                self.config = dataclasses.replace(config, chunk_context=needed)

    # -- model space ----------------------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.config.modality

    @property
    def media(self) -> Modality:
        """What this tokenizer's kind of media is (:mod:`tokenizers_vq.modality`)."""
        return get_modality(self.config.modality)

    @property
    def sample_rate(self) -> int | None:
        """Audio: samples per second the model codes (files are resampled to it); else ``None``."""
        return getattr(self.backbone_config, "sample_rate", None)

    @property
    def frame_rate(self) -> float | None:
        """Audio: token frames per second (tokens per second per codebook); else ``None``."""
        return getattr(self.backbone_config, "tokens_per_second", None)

    @property
    def codebook_size(self) -> int:
        """Distinct ids per codebook: codes lie in ``[0, codebook_size)``."""
        return self.quantizer.codebook_size

    @property
    def num_codebooks(self) -> int:
        """Codes per latent cell (residual levels x groups; 1 for a single codebook)."""
        return self.quantizer.num_codebooks

    @property
    def is_dynamic(self) -> bool:
        """Whether the bottleneck is a :class:`DynamicQuantizer` (``encode`` gives :class:`PackedCodes`)."""
        return isinstance(self.quantizer, DynamicQuantizer)

    def forward(self, x: Tensor) -> TokenizerOutput:
        """Training pass on stride-aligned input (crops): reconstruction, codes, losses.
        A dynamic-length model needs crops aligned to twice the stride (even latents);
        its ``codes`` are the dense map (a coarse region's code on each of its cells)."""
        h = self.encoder(self._check_media(x, aligned=True)).movedim(1, -1)
        q = self.quantizer(h)
        rec = self.decoder(q.quantized.movedim(-1, 1))
        return TokenizerOutput(rec, q.codes, q.losses, q.metrics)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor | PackedCodes:
        """Codes ``(B, *grid, *code_shape)`` of media of any size (padded to the
        stride here; long audio in overlapping chunks, long video in clips).

        A dynamic-length model returns :class:`PackedCodes` instead, over the latent of
        the media padded to twice the stride (replicate for pixels, zeros for audio) so
        that its sizes are even, as the 2-cell regions need. Each item is coded whole, in
        one window: packed codes of audio chunks would not join, and video is refused.
        """
        with deferred.checked_at_end():  # the input's and the latent's checks wait for one sync, at the end
            x = self._check_media(x, aligned=False)
            if self.is_dynamic:
                return self._encode_aligned(self._pad(x, mult=2))
            if self.media.streams:
                return self._audio_chunks(x, self._encode_aligned, self.backbone_config.hop, 1)
            if self.media.clips:
                return torch.cat([self._encode_aligned(self._pad(c)) for c in x.split(self.config.clip_frames, dim=2)], 1)
            return self._encode_aligned(self._pad(x))

    @torch.no_grad()
    def decode(self, codes: Tensor | PackedCodes, size: tuple[int, ...] | None = None) -> Tensor:
        """Media ``(B, C, ...)`` from codes (:class:`PackedCodes` for a dynamic-length
        model); ``size`` (``(H, W)``, ``(T,)`` or ``(T, H, W)``) crops the stride padding
        back off."""
        if isinstance(codes, PackedCodes) != self.is_dynamic:
            raise ValueError(f"decode takes the PackedCodes of a dynamic-length tokenizer, got {type(codes).__name__}"
                             if self.is_dynamic else
                             "PackedCodes need a tokenizer with a dynamic-length bottleneck (QuantizerConfig.dynamic)")
        size = None if size is None else self.media.check_size(size)  # (audio: a bare sample count too)
        grid = None if size is None else self.grid_shape(size)
        self.media.check_codes(codes, self.quantizer.code_shape, size, grid, self.config.name, packed=self.is_dynamic)
        if self.media.streams and not self.is_dynamic:
            out = self._audio_chunks(codes, self._decode_aligned, 1, self.backbone_config.hop)
        elif self.media.clips:
            per_clip = 1 + (self.config.clip_frames - 1) // self.backbone_config.temporal_factor
            out = torch.cat([self._decode_aligned(c) for c in codes.split(per_clip, dim=1)], dim=2)
        else:  # (a dynamic-length model's packed codes whole)
            out = self._decode_aligned(codes)
        return out if size is None else out[(..., *[slice(0, s) for s in size])]

    def encode_stream(self) -> AudioEncodeStream:
        """A stream that codes audio pushed in chunks of any length: ``push(chunk)``
        returns the ``(frames, *code_shape)`` codes that are final, ``flush()`` the
        rest; together they equal ``encode`` of the whole ``(1, 1, T)`` waveform.
        A token is final once the last sample of its frame has arrived (at most
        ``hop - 1`` samples of delay). Causal audio models only; see
        :mod:`tokenizers_vq.streaming`.

        Example:
            >>> q = QuantizerConfig("vq", {"codebook_size": 16})
            >>> small = {"channels": 4, "strides": [2, 4], "latent_dim": 8, "causal": True, "decoder_layers": 1}
            >>> tok = Tokenizer(TokenizerConfig("audio", {**small, "decoder_dim": 16}, q)).eval()
            >>> x = torch.randn(100)  # hop = 8 samples per frame
            >>> enc = tok.encode_stream()
            >>> parts = [enc.push(x[:30]), enc.push(x[30:32]), enc.push(x[32:]), enc.flush()]
            >>> [p.shape[0] for p in parts]  # frames 0-2 end at sample 23, frame 3 at 31
            [3, 1, 8, 1]
            >>> codes = torch.cat(parts)
            >>> torch.equal(codes, tok.encode(x.view(1, 1, -1))[0])
            True
            >>> dec = tok.decode_stream()
            >>> audio = torch.cat([dec.push(codes[:5]), dec.push(codes[5:]), dec.flush(size=100)], dim=1)
            >>> audio.shape
            torch.Size([1, 100])
            >>> torch.allclose(audio, tok.decode(codes[None], size=(100,))[0], atol=1e-5)
            True
        """
        return AudioEncodeStream(self)

    def decode_stream(self) -> AudioDecodeStream:
        """A stream that decodes code frames pushed in chunks: ``push(codes)`` with
        ``(n, *code_shape)`` codes returns the ``(1, m)`` samples that are final,
        ``flush(size)`` the rest; together they equal ``decode`` of all the codes.
        The samples of frame ``k`` are final once code frame ``k + 2`` has arrived
        (``2 * hop`` samples of delay, from the iSTFT's overlap). Causal audio models
        only; example in :meth:`encode_stream`."""
        return AudioDecodeStream(self)

    def _encode_aligned(self, x: Tensor) -> Tensor | PackedCodes:
        # eval: no mode switch (it walks every module, ~0.4 ms); training: each module's own mode back after
        with contextlib.nullcontext() if not self.training else evaluating(self):
            return self._per_item(lambda i: self.quantizer.encode(self.encoder(i).movedim(1, -1)), x)

    def _per_item(self, fn, x: Tensor):
        """``fn(x)``, item by item on the CPU outside autocast (its convolutions sum a batch otherwise than one item)."""
        if self.is_dynamic or x.device.type != "cpu" or len(x) == 1 or torch.is_autocast_enabled("cpu"):
            return fn(x)
        return torch.cat([fn(i) for i in x.split(1)])

    def _check_dynamic(self) -> None:
        if self.is_dynamic and self.media.region_cells is None:
            raise ValueError(f"dynamic-length codes are for images and audio, not {self.modality}: leave out "
                             f"the quantizer's dynamic field (QuantizerConfig.dynamic) for a {self.modality} model")

    def _decode_aligned(self, codes: Tensor | PackedCodes) -> Tensor:
        dtype = next(self.decoder.parameters()).dtype
        return self._per_item(lambda c: self.decoder(self.quantizer.decode(c).movedim(-1, 1).to(dtype)), codes)

    def _audio_chunks(self, x: Tensor, fn, unit_in: int, unit_out: int) -> Tensor:
        """Apply ``fn`` over time in chunks of ``chunk_frames`` latent frames with
        ``chunk_context`` frames of context each side (left only when a causal model encodes),
        keeping the chunk centres. ``unit_in``/``unit_out``: samples per latent frame of ``fn``'s input/output."""
        axis = x.ndim - 1 if unit_in > 1 else 1  # waveform time axis, or the codes' frame axis
        x = self._pad(x) if unit_in > 1 else x
        frames = x.shape[axis] // unit_in
        chunk, ctx = self.config.chunk_frames, self.config.chunk_context
        ahead = 0 if unit_in > 1 and getattr(self.backbone_config, "causal", False) else ctx  # decoding looks ahead
        if frames <= chunk + ctx + ahead:
            return fn(x)
        parts = []
        for s in range(0, frames, chunk):
            a, b = max(0, s - ctx), min(frames, s + chunk + ahead)
            out = fn(x.narrow(axis, a * unit_in, (b - a) * unit_in))
            out_axis = out.ndim - 1 if unit_out > 1 else 1
            n = min(chunk, frames - s)
            parts.append(out.narrow(out_axis, (s - a) * unit_out, n * unit_out))
        return torch.cat(parts, dim=out_axis)

    def _pad(self, x: Tensor, mult: int = 1) -> Tensor:
        """Pad the trailing axes up to ``mult`` times the stride (replicate for pixels,
        zeros for audio; video time to ``1 + 4k`` frames by repeating the last frame)."""
        b, tf = self.backbone_config, getattr(self.backbone_config, "temporal_factor", None)
        x = self.media.pad(x, tuple(mult * s for s in b.stride))
        return x if tf is None else self.media.pad_time(x, tf)

    def _check_media(self, x: Tensor, aligned: bool) -> Tensor:
        """``x`` checked, in the weights' dtype (under autocast: fp32 or its dtype, which it casts; others in fp32)."""
        want, weights = self.media.input_ndim, next(self.parameters()).dtype
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{self.modality} input must be a floating-point torch tensor, {not_a_float_tensor(x)}: "
                             f"{self.media.input_scale}")
        if x.ndim != want:
            raise ValueError(f"{self.modality} input must have {want} axes {self.media.layout}, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"empty {self.modality} input: shape {tuple(x.shape)}")
        channels = getattr(self.backbone_config, "in_channels", 1)  # checked here: the backbone sees it padded
        if x.shape[1] != channels:
            raise ValueError(f"{self.modality} input has {x.shape[1]} channels but this model expects {channels} "
                             f"on axis 1 {self.media.layout}: shape {tuple(x.shape)}")
        if self.media.has_pixels and min(x.shape[-2:]) < 8:
            raise ValueError(f"{self.modality} frames are {x.shape[-1]}x{x.shape[-2]}; at least 8x8 pixels are needed")
        if not torch.compiler.is_compiling():
            deferred.check(self.media.input_range(x), self.media.check_range)
        auto = torch.is_autocast_enabled(x.device.type)  # (fp64, or fp16 in a CPU bf16 region, would not run)
        keep = (torch.float32, torch.get_autocast_dtype(x.device.type)) if auto else (weights,)
        return x if x.dtype in keep else x.to(keep[0])

    # -- saving and loading ---------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        training_state: bool = True) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (together: a failed write leaves
        a model saved there before as it was).

        Args:
            dtype: store floating-point tensors in this type (e.g. ``torch.float16`` to
                halve the file); tensors whose values would not fit stay as they are.
                ``from_pretrained`` loads either back into float32.
            training_state: False leaves out state only training reads (a VQ's EMA sums, which
                loading rebuilds from the codebook and its counts): a smaller file to ship.
        """
        directory, left_out = named_path(directory), set() if training_state else training_only_keys(self)
        state = {k.replace("_orig_mod.", ""): v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if k not in left_out}  # (a torch.compile'd part's tensors by their own names)
        if dtype is not None:
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"save_pretrained dtype must be a floating-point torch dtype (e.g. torch.float16), got {dtype!r}")
            big = torch.finfo(dtype).max / 2
            state = {k: v.to(dtype) if v.is_floating_point() and (v.numel() == 0 or float(v.abs().max()) < big) else v
                     for k, v in state.items()}
        config = saved_config(self.config, self.quantizer)
        meta = {"format": "pt", **architecture_metadata(config)}
        text = json.dumps(asdict(config), indent=2)
        atomic_write_all({directory / "model.safetensors": lambda tmp: save_safetensors(state, tmp, metadata=meta, digest=True),
                          directory / "config.json": lambda tmp: Path(tmp).write_text(text)})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike | None = None, map_location: str = "cpu") -> Tokenizer:
        """Rebuild from ``directory``, or an embedded model by name: ``"image"`` (the
        default), ``"speech"``, ``"speech-rvq"`` or ``"video"`` (see :data:`PRETRAINED`; a folder of that
        name in the working directory is not taken for it), on ``map_location`` (a name or a device).

        Raises:
            ValueError: the directory, ``config.json`` or ``model.safetensors`` is missing or corrupt, or the weights do not fit.
        """
        if isinstance(directory, str) and directory in PRETRAINED and Path(directory, "config.json").is_file():
            warnings.warn(f"{directory!r} names the embedded model, not the tokenizer in ./{directory}: pass "
                          f"'./{directory}' (a path) to load that one", stacklevel=2)
        if directory is None or (isinstance(directory, str) and directory in PRETRAINED):
            directory = PRETRAINED[directory or "image"]
        directory = named_path(directory)
        cfg_path, weights = directory / "config.json", directory / "model.safetensors"
        for p in (directory, cfg_path, weights):
            if not p.exists():
                raise ValueError(f"not a tokenizer directory: {p} is missing" + (f" (or name an embedded model: {', '.join(PRETRAINED)})" if p == directory else ""))
        try:  # not JSON, not UTF-8, fields of other types or values no model is built from
            model = cls(TokenizerConfig.from_dict(json.loads(cfg_path.read_text())))
        except (ValueError, TypeError, AttributeError, OSError, RuntimeError, MemoryError) as e:  # (sizes past memory)
            raise ValueError(f"corrupt {cfg_path}, or a model this machine cannot build from it: {e}") from e
        device, (state, metadata) = device_named(map_location), load_weights_file(weights)
        own = model.state_dict()  # weights stored at a lower precision load back at the model's
        state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
        mismatched = [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} for the config"
                      for k, v in state.items() if k in own and v.shape != own[k].shape]
        if mismatched:
            raise ValueError(f"{weights} does not fit {cfg_path} (edited config, or weights of another model?): "
                             f"{'; '.join(mismatched[:3])}; restore the config.json saved with these weights")
        check_architecture(model.config, cfg_path, weights, metadata)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit {cfg_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(device).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tokens_per_unit(self) -> float:
        """Tokens per image pixel, per second of audio, or per video frame pixel (for a
        dynamic-length model, the mean at its target fine ratio)."""
        b, q = self.backbone_config, self.quantizer
        if self.is_dynamic:  # a region of `cells` latent cells is 1 coarse or `cells` fine tokens
            cells = self.media.region_cells
            n = q.inner.num_codebooks * (1 + q.target_fine_ratio * (cells - 1)) / cells
        else:  # tokens per latent position; a multi-scale quantizer's maps are smaller than the grid
            axes, side = len(b.stride) + (1 if hasattr(b, "temporal_factor") else 0), 256  # a large grid's mean
            n = q.num_tokens((side,) * axes) / side**axes
        per_unit = getattr(b, "sample_rate", 1) / math.prod(b.stride)  # audio: per second, not per sample
        clip = self.config.clip_frames  # video: 1 + (clip - 1) / factor latent frames per clip, its first frame apart
        return n * per_unit * ((1 + (clip - 1) // b.temporal_factor) / clip if hasattr(b, "temporal_factor") else 1)

    def grid_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        """The latent grid ``encode`` gives for media of ``size`` (``(H, W)``, ``(T,)``
        or ``(T, H, W)``): the leading axes of its codes ``(*grid, *code_shape)``, or
        ``PackedCodes.shape`` for a dynamic-length model.

        Each axis is the size over the stride, rounded up (to an even count for a
        dynamic-length model); video time goes clip by clip (``clip_frames`` frames,
        the last clip shorter): a clip of ``t`` frames gives ``1 + ceil((t - 1) / 4)``
        latent frames for a temporal factor of 4.
        """
        b, m, size = self.backbone_config, 2 if self.is_dynamic else 1, self.media.check_size(size)
        cells = tuple(m * c for c in self.media.grid(size, tuple(m * s for s in b.stride)))
        if len(size) == len(b.stride):
            return cells
        clip, tf = self.config.clip_frames, b.temporal_factor
        frames = sum(1 - (-(min(clip, size[0] - s) - 1) // tf) for s in range(0, size[0], clip))
        return (frames, *cells)

    def bits_per_token(self) -> float:
        return math.log2(self.quantizer.codebook_size)
