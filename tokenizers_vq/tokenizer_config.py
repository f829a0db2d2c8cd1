"""The configuration a tokenizer is rebuilt from (``config.json``): its modality,
backbone fields and quantizer."""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import hashlib
import importlib
import inspect
import json
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from tokenizers_vq.quantizers import (FSP, FSQ, IBQ, LFQ, BinaryMapper, DynamicQuantizer, GroupedQuantizer,
                                      LatentQuantizer, MultiScaleResidualQuantizer, ProjectedCodebookVQ, Quantizer,
                                      ResidualQuantizer, SimVQ, VectorQuantizer)

QUANTIZER_KINDS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "fsq": FSQ,
    "lfq": LFQ,
    "projected_vq": ProjectedCodebookVQ,
    "latent": LatentQuantizer,
    "simvq": SimVQ,
    "ibq": IBQ,
    "multiscale": MultiScaleResidualQuantizer,
    "fsp": FSP,
    "binary_mapper": BinaryMapper,
}


def quantizer_class(kind: str) -> type[Quantizer]:
    """The class of a quantizer ``kind``: a key of :data:`QUANTIZER_KINDS`, or
    ``"package.module:Class"`` naming a :class:`~tokenizers_vq.quantizers.Quantizer`
    subclass of your own. Its top-level package must already be imported (``import
    package`` before building or loading such a model), so that a saved ``config.json``
    cannot make the library import, and run, a package nobody asked for."""
    if kind in QUANTIZER_KINDS:
        return QUANTIZER_KINDS[kind]
    if ":" not in kind:
        raise ValueError(f"unknown quantizer kind {kind!r}; choose from {sorted(QUANTIZER_KINDS)} or name your own "
                         "Quantizer subclass as 'package.module:Class'")
    module, _, name = kind.partition(":")
    if module.partition(".")[0] not in sys.modules:
        raise ValueError(f"quantizer kind {kind!r}: package {module.partition('.')[0]!r} is not imported; import it "
                         "first (a model config names its quantizer's class, it does not import new packages)")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"quantizer kind {kind!r}: cannot import {name} from {module} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise ValueError(f"quantizer kind {kind!r} is not a Quantizer subclass")
    return cls


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value (as JSON or YAML give it) has the type a constructor declares:
    ints for ``int`` (not bools), numbers for ``float``, lists of them for sequences, one of
    the literals, any member of a union; types it cannot check pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


@dataclass
class QuantizerConfig:
    """Which quantizer sits in the bottleneck.

    Attributes:
        kind: a key of ``QUANTIZER_KINDS`` (``"vq"``, ``"fsq"``, ``"lfq"``), or your own
            quantizer class as ``"package.module:Class"`` (see :func:`quantizer_class`).
        options: keyword arguments of that class except ``dim``
            (e.g. ``{"codebook_size": 1024}`` or ``{"levels": [8, 5, 5, 5]}``).
        levels: residual levels (> 1 wraps in :class:`ResidualQuantizer`).
        groups: channel groups (> 1 wraps in :class:`GroupedQuantizer`).
        dropout: quantizer dropout of the residual wrapper.
        shared_codebook: the residual levels share one codebook (``levels`` > 1).
        beam_size: the residual wrapper's encode-time beam (``levels`` > 1; 1 is greedy).
        dynamic: ``None`` (fixed grids), or keyword arguments of
            :class:`DynamicQuantizer` except ``inner`` (e.g.
            ``{"target_fine_ratio": 0.3}``; ``{}`` for its defaults): wraps the
            quantizer above in DQ-VAE style coarse/fine routing, so that the tokenizer
            codes images and audio into :class:`PackedCodes`.
    """

    kind: str = "vq"
    options: dict[str, Any] = field(default_factory=lambda: {"codebook_size": 1024})
    levels: int = 1
    groups: int = 1
    dropout: float = 0.0
    shared_codebook: bool = False
    beam_size: int = 1
    dynamic: dict[str, Any] | None = None

    def __post_init__(self):
        cls = quantizer_class(self.kind)
        for name in ("levels", "groups", "beam_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"quantizer.{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout <= 1:
            raise ValueError(f"quantizer.dropout must be a number in [0, 1], got {self.dropout!r}")
        if (self.shared_codebook or self.beam_size != 1) and self.levels < 2:
            raise ValueError(f"quantizer.shared_codebook={self.shared_codebook} and beam_size={self.beam_size} are "
                             f"options of residual levels: set quantizer.levels >= 2 (got {self.levels})")
        if self.dropout and self.levels < 2:  # (a warning: models saved with it must keep loading)
            warnings.warn(f"quantizer.dropout={self.dropout} drops residual levels, and there is one "
                          f"(quantizer.levels={self.levels}): it has no effect", stacklevel=3)
        params = inspect.signature(cls).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            allowed = set(params) - {"dim", "self"}
            unknown = sorted(set(self.options) - allowed)
            if unknown:
                close = {u: difflib.get_close_matches(u, allowed, n=1) for u in unknown}
                hint = "; ".join(f"{u!r}: did you mean {c[0]!r}?" for u, c in close.items() if c)
                raise ValueError(f"unknown options {unknown} for quantizer kind {self.kind!r} "
                                 f"(quantizer.options){'; ' + hint if hint else ''}; it takes {sorted(allowed)}")
        try:
            hints = typing.get_type_hints(cls.__init__)
        except (NameError, TypeError):  # annotations this module cannot resolve: names checked only
            hints = {}
        for name, value in self.options.items():
            if name == "features" and _features_in_weights(value) is not None:
                continue
            if name in hints and not _fits(value, hints[name]):
                raise ValueError(f"quantizer option {name}={value!r} ({type(value).__name__}) for kind {self.kind!r} "
                                 f"should be {_type_name(hints[name])}")
        if self.dynamic is not None:
            self._check_dynamic()
        needed = [n for n, p in list(params.items())[1:]  # the first takes the latent size, as build passes it
                  if p.default is inspect.Parameter.empty
                  and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        missing = [n for n in needed if n not in self.options]
        if missing:
            raise ValueError(f"quantizer kind {self.kind!r} needs the options {missing} (quantizer.options), "
                             f"e.g. {_example_options(self.kind, missing)}")

    def _check_dynamic(self) -> None:
        if not isinstance(self.dynamic, dict):
            raise ValueError(f"quantizer.dynamic must map DynamicQuantizer options to values (or be null), got {self.dynamic!r}")
        allowed = set(inspect.signature(DynamicQuantizer).parameters) - {"inner"}
        if unknown := sorted(set(self.dynamic) - allowed):
            raise ValueError(f"unknown DynamicQuantizer options {unknown} in the quantizer's dynamic field; it takes "
                             f"{sorted(allowed)}")
        hints = typing.get_type_hints(DynamicQuantizer.__init__)
        for name, value in self.dynamic.items():
            if not _fits(value, hints.get(name, Any)):
                raise ValueError(f"quantizer.dynamic option {name}={value!r} ({type(value).__name__}) should be "
                                 f"{_type_name(hints[name])}")

    def build(self, dim: int) -> Quantizer | DynamicQuantizer:
        if dim % self.groups:
            raise ValueError(f"latent dim {dim} is not divisible by groups={self.groups}")
        cls, d = quantizer_class(self.kind), dim // self.groups
        options = dict(self.options)
        shape = _features_in_weights(options.get("features"))
        if shape is not None:  # placeholders of the saved shape, filled by the weights as they load
            options["features"] = torch.zeros(shape)

        def one() -> Quantizer:
            if self.levels == 1:
                return cls(d, **options)
            if self.shared_codebook:
                return ResidualQuantizer([cls(d, **options)], dropout=self.dropout, shared_levels=self.levels,
                                         beam_size=self.beam_size)
            return ResidualQuantizer([cls(d, **options) for _ in range(self.levels)], dropout=self.dropout,
                                     beam_size=self.beam_size)

        q = one() if self.groups == 1 else GroupedQuantizer([one() for _ in range(self.groups)])
        if self.dynamic is None:
            return q
        return DynamicQuantizer(q, **self.dynamic)


FEATURES_IN_WEIGHTS = "in_weights"
"""Key of the ``features`` option a saved config holds in place of a projected codebook's
features (a tensor or a file path): ``{"in_weights": [K, F]}``, the shape of the buffer
that ``model.safetensors`` holds, so a saved model needs neither the tensor in JSON nor
the original file."""


def _example_options(kind: str, names: list[str]) -> dict[str, Any]:
    """Example values for a quantizer's required options, for an error message."""
    known = {"codebook_size": 1024, "levels": [8, 5, 5, 5], "num_bits": 10, "scales": [1, 2, 4, 8, 16]}
    return {n: known.get(n, "...") for n in names}


def _features_in_weights(value: Any) -> tuple[int, int] | None:
    """The ``(K, F)`` of a :data:`FEATURES_IN_WEIGHTS` marker, else None."""
    if isinstance(value, dict) and set(value) == {FEATURES_IN_WEIGHTS}:
        shape = value[FEATURES_IN_WEIGHTS]
        if (isinstance(shape, (list, tuple)) and len(shape) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            return int(shape[0]), int(shape[1])
        raise ValueError(f"quantizer option features={value!r}: {FEATURES_IN_WEIGHTS!r} takes the [rows, columns] "
                         "of the features buffer in model.safetensors")
    return None


def saved_config(config: TokenizerConfig, quantizer: torch.nn.Module) -> TokenizerConfig:
    """``config`` as ``config.json`` stores it: a projected codebook's ``features`` option (a
    tensor, which JSON cannot hold, or a file path, which may be gone where the model is
    loaded) becomes a :data:`FEATURES_IN_WEIGHTS` marker of the buffer's shape, since the
    weights hold the features themselves; vector quantizers swapped for ones of another size
    (``quantizers.shrink_codebook``, every residual level or group alike) have their
    ``codebook_size`` recorded, as their weights hold. Levels of different sizes, which one
    ``codebook_size`` cannot describe, raise ``ValueError`` before anything is written."""
    from tokenizers_vq.quantizers import ProjectedCodebookVQ, VectorQuantizer  # noqa: PLC0415

    options = config.quantizer.options
    sizes = (sorted({m.codebook_size for m in quantizer.modules() if isinstance(m, VectorQuantizer)})
             if issubclass(quantizer_class(config.quantizer.kind), VectorQuantizer) else [])
    if len(sizes) > 1:
        raise ValueError(f"the quantizer's levels hold codebooks of {sizes} codes, but config.json records one "
                         "codebook_size for all of them: shrink every level to the same size "
                         "(quantizers.shrink_codebook) before saving")
    size = sizes[0] if sizes else None
    if size is not None and options.get("codebook_size", size) != size:
        options = {**options, "codebook_size": size}
    if "features" in options and options["features"] is not None and not _features_in_weights(options["features"]):
        buffer = next((m.features for m in quantizer.modules() if isinstance(m, ProjectedCodebookVQ)), None)
        if buffer is not None:  # (another quantizer's option of that name: saved as given)
            options = {**options, "features": {FEATURES_IN_WEIGHTS: list(buffer.shape)}}
    if options is config.quantizer.options:
        return config
    return dataclasses.replace(config, quantizer=dataclasses.replace(config.quantizer, options=options))


@dataclass
class TokenizerConfig:
    """Everything needed to rebuild a tokenizer; saved as ``config.json``.

    Attributes:
        modality: ``"image"``, ``"audio"`` or ``"video"``.
        backbone: fields of that modality's backbone config (defaults where absent).
        quantizer: the bottleneck.
        name: model id written into token files.
        chunk_frames: audio: latent frames encoded per chunk of long audio.
        chunk_context: audio: extra latent frames of context on each side of a chunk (a
            causal model encodes with the left side only: its codes never depend on later
            samples); a causal model raises it to cover its receptive fields (so chunked
            offline coding gives exactly what streaming gives).
        clip_frames: video: frames per independently coded clip (``1 + 4k``).
    """

    modality: str = "image"
    backbone: dict[str, Any] = field(default_factory=dict)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    name: str = "tokenizers_vq"
    chunk_frames: int = 500
    chunk_context: int = 25
    clip_frames: int = 17

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"the model's name must be a non-empty string (token files record it), got {self.name!r}")
        for field_name, least in (("chunk_frames", 1), ("chunk_context", 0), ("clip_frames", 1)):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{field_name} must be a whole number >= {least}, got {value!r}")

    def check_clips(self, temporal_factor: int | None) -> None:
        """A video model codes clips of ``1 + temporal_factor * k`` frames (each clip's first
        frame on its own): another ``clip_frames`` would be padded when encoded and cut short
        when decoded."""
        if temporal_factor and (self.clip_frames - 1) % temporal_factor:
            fit = 1 + temporal_factor * max(1, (self.clip_frames - 1) // temporal_factor)
            raise ValueError(f"clip_frames={self.clip_frames}: a video model with {temporal_factor}x temporal "
                             f"compression codes clips of 1 + {temporal_factor}k frames; use e.g. {fit}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown tokenizer config fields {sorted(unknown)}")
        d = dict(d)
        d["quantizer"] = QuantizerConfig(**d.get("quantizer", {}))
        return cls(**d)


def backbone_config(cls: type, d: dict[str, Any]):
    """Backbone config dataclass ``cls`` from a ``config.backbone`` dict: lists become tuples;
    a field whose default is a tuple, an int, a float or a bool takes only that kind."""
    if not isinstance(d, dict):
        raise ValueError(f"the backbone config must be a mapping of {cls.__name__} fields, got {d!r}")
    names = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    kinds = {tuple: ("a list", (list, tuple)), bool: ("true or false", bool), int: ("an integer", int),
             float: ("a number", (int, float))}
    for key, value in d.items():
        default = names[key].default
        want = next((kinds[t] for t in kinds if isinstance(default, t)), None)
        if want is not None and value is not None and (not isinstance(value, want[1]) or (
                isinstance(value, bool) and not isinstance(default, bool))):
            example = f", such as {list(default)}" if isinstance(default, tuple) else ""
            raise ValueError(f"backbone.{key} must be {want[0]}{example}, got {value!r}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _signature_defaults(cls: type) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(cls).parameters.values() if p.default is not p.empty}


def filled_config(config: TokenizerConfig, defaults_only: bool = False) -> dict[str, Any]:
    """``config`` as a dict with every default written out (the backbone's fields, the quantizer
    class's options): two configs that build the same model give equal dicts, whichever
    defaults either wrote out. ``defaults_only``: the same with none of ``config``'s backbone
    fields, quantizer options or settings (its modality, quantizer kind and whether it is dynamic kept)."""
    from tokenizers_vq.backbones import BACKBONES  # noqa: PLC0415

    q = config.quantizer
    quantizer = {**dataclasses.asdict(QuantizerConfig()), "kind": q.kind, "options": {}, "dynamic": None if q.dynamic
                 is None else {}} if defaults_only else dataclasses.asdict(q)
    quantizer["options"] = {**_signature_defaults(quantizer_class(q.kind)), **quantizer["options"]}
    if quantizer["dynamic"] is not None:
        quantizer["dynamic"] = {**_signature_defaults(DynamicQuantizer), **quantizer["dynamic"]}
    out = {**dataclasses.asdict(config), "quantizer": quantizer, "backbone": dataclasses.asdict(
        backbone_config(BACKBONES[config.modality][0], {} if defaults_only else config.backbone))}
    return json.loads(json.dumps(out, default=repr))  # (tuples as lists, as a saved config has them)


def _changed(d: dict[str, Any], base: dict[str, Any], nested: tuple[str, ...]) -> dict[str, Any]:
    """The entries of ``d`` that ``base`` lacks or holds otherwise (the ``nested`` mappings entry by entry)."""
    return {k: _changed(v, base[k], nested) if k in nested and isinstance(v, dict) and isinstance(base.get(k), dict)
            else v for k, v in d.items() if k not in base or v != base[k]}


def architecture_sha256(config: TokenizerConfig, written: bool = False) -> str:
    """Hex sha256 of what shapes a model's computation: its modality, quantizer kind, and backbone
    and quantizer settings where they differ from their defaults (a field added later with a
    default, or a default written out or left out, changes nothing); ``written``: over the
    backbone and options as the config writes them. Saved with the weights
    (:func:`architecture_metadata`), it tells a ``config.json`` edited since from the one saved
    with them where the weight shapes still fit (FSQ levels reordered, LFQ made spherical)."""
    if written:
        defaults = dataclasses.asdict(QuantizerConfig())
        quantizer = {k: v for k, v in dataclasses.asdict(config.quantizer).items() if v != defaults.get(k)}
        parts = [config.modality, config.backbone, quantizer]
    else:
        filled, base = filled_config(config), filled_config(config, defaults_only=True)
        parts = [config.modality, config.quantizer.kind, config.quantizer.dynamic is not None,
                 *(_changed(filled[k], base[k], ("options", "dynamic")) for k in ("backbone", "quantizer"))]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def architecture_metadata(config: TokenizerConfig) -> dict[str, str]:
    """Both forms of :func:`architecture_sha256`, as ``model.safetensors``' metadata holds them."""
    return {"architecture_sha256": architecture_sha256(config, written=True),
            "architecture_sha256_nondefault": architecture_sha256(config)}


def check_architecture(config: TokenizerConfig, config_path: Any, weights_path: Any, metadata: dict[str, str]) -> None:
    """Refuse a config (from ``config_path``) that computes otherwise than the one ``weights_path``
    was saved with (:func:`architecture_metadata`: the defaults-free form where the file holds it,
    else the written form; a file with neither is not checked), naming both files and the fix."""
    nondefault, written = metadata.get("architecture_sha256_nondefault"), metadata.get("architecture_sha256")
    if (nondefault is not None and nondefault != architecture_sha256(config)) or (
            nondefault is None and written not in (None, architecture_sha256(config, written=True))):
        raise ValueError(f"{config_path} was edited since {weights_path} was saved with it: its modality, backbone or "
                         "quantizer settings differ, and these weights compute something else under them; restore "
                         "the config.json saved with these weights (name, chunk and clip settings may change)")
