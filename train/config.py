"""Training configuration: dataclasses with their defaults, YAML and
``--section.key=value`` overrides at the edge (the library never reads YAML)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers_vq.errors import optional_module
from tokenizers_vq.tokenizer import QuantizerConfig, TokenizerConfig


@dataclass
class DataConfig:
    """Folders of media; ``train`` is required, ``val`` optional."""

    train: str = ""
    val: str = ""
    crop: int = 128  # image / video crop side in pixels
    # image / video: above crop, each step draws its crop's height and width from [crop, crop_max]
    # (fewer items, about the same pixels): a model trained on one size can colour other sizes (0: off)
    crop_max: int = 0
    segment_seconds: float = 1.0  # audio segment length
    clip_frames: int = 17  # video frames per clip (1 + 4k)
    val_fraction: float = 0.0  # without a val folder: hold apart the last files (e.g. unseen speakers)
    max_items: int = 0  # use at most this many files (0: all)
    max_frames: int = 120  # video: frames decoded per file
    stills: str = ""  # video: a folder of photos, each panned across into clips ("": none)
    stills_fraction: float = 0.5  # video: the share of a batch's clips cut from the photos
    max_pan: int = 4  # video: the fastest pan across a photo, pixels per frame on each axis


@dataclass
class LossConfig:
    """Weights of the named loss terms (0 turns a term off)."""

    l1: float = 1.0
    l2: float = 0.0
    perceptual: float = 0.0  # LPIPS (images, video frames)
    lpips_net: str = "vgg"
    lpips_weights: str = ""  # torchvision backbone weights ("": the torch hub cache)
    lpips_heads: str = ""  # lpips v0.1 linear heads ("": from the installed lpips package)
    mel: float = 0.0  # multi-scale mel distance (audio)
    stft: float = 0.0  # multi-resolution STFT loss (audio)
    quantizer: float = 1.0  # the quantizer's own (already beta-weighted) losses
    adversarial: float = 0.0  # 0: no adversary (no discriminator is built; feature_matching and lecam idle)
    disc_start: int = 0  # step at which the discriminator and the GAN term start
    adaptive_weight: bool = True  # VQGAN's gradient-norm balance at the decoder's last layer
    feature_matching: float = 0.0
    lecam: float = 0.0
    lecam_decay: float = 0.99


@dataclass
class OptimConfig:
    lr: float = 2e-4
    disc_lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0  # AdamW's, of the generator and the discriminator
    grad_clip: float = 1.0  # max gradient norm (0: off)
    warmup_steps: int = 0
    # the generator's learning rate falls to zero along a cosine over the last decay_steps
    # of the run's steps (0: constant after warm-up); a run cut short by max_minutes stops
    # part-way down, so set steps to what fits the minutes
    decay_steps: int = 0

    def lr_factor(self, step: int, steps: int) -> float:
        """The generator's learning rate at ``step`` (0-based) of a ``steps``-step run, as a
        fraction of ``lr``: a linear warm-up, then constant, then the cosine decay."""
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        start = steps - self.decay_steps
        if self.decay_steps <= 0 or step < start:
            return warm
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / self.decay_steps)))


@dataclass
class TrainConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate)
    seed: int = 0
    out_dir: str = "runs/run"
    log_every: int = 10
    sample_every: int = 500  # pictures / audio samples beside the checkpoint (0: none)
    save_every: int = 500
    ema_decay: float = 0.999  # EMA of the generator's weights (0: off)
    max_minutes: float = 0.0  # stop (and save) after this wall time (0: no limit; several processes stop together, checked every 10 steps, before it)
    cudnn_benchmark: bool = False  # GPU: let cuDNN time its kernels (faster; sets a process-wide flag)
    # warm start: an embedded model's name (image, speech, video), a tokenizer folder or a
    # training checkpoint folder; its model config must be this run's (the name aside, and an
    # audio backbone's causal flag, which changes the padding only: a causal model can start
    # from an offline one; and a video decoder may have more decoder_res_blocks, the added
    # blocks starting as the identity). Only the weights are taken; optimiser, discriminator and step start
    # afresh. A checkpoint of this run's own out_dir still takes precedence (resume).
    init_from: str = ""
    # what init_from gives the quantizer: "all" (the same quantizer config, its state too),
    # "first_level" (a single-level source quantizer becomes level 0 of this run's residual one
    # with the same options; the other levels start fresh with a zero output projection, so
    # the warm-started model decodes as the source at step 0) or "none" (encoder and decoder
    # only; the quantizer starts fresh)
    init_quantizer: str = "all"


def _typed(val: Any, key: str, written: dict[str, str] | None) -> Any:
    """The override's text for ``key`` as typed (YAML would read ``2024`` as a number, a date,
    ``True`` as a boolean, `` #2`` as a comment), unless it is empty or a quoted YAML string
    (``'2024'``: its contents); else ``val``: what a text setting takes."""
    if val is None or key not in (written or {}) or (isinstance(val, str) and written[key][:1] in ("'", '"')):
        return val
    return written[key]


def _build(cls: type, values: dict[str, Any], where: str, written: dict[str, str] | None = None) -> Any:
    """Dataclass ``cls`` from a dict, recursing into dataclass fields; unknown keys
    are errors. ``written``: overrides' text by dotted key, what a text field takes as typed
    (``--data.train=2024`` is the folder ``2024``, ``--out_dir=0123`` keeps its 0,
    ``--out_dir=2024-06-01`` and ``--out_dir="runs/exp #2"`` are that text)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        import difflib  # noqa: PLC0415

        nested = [f"{name}.{u}" for name, h in hints.items() if dataclasses.is_dataclass(h)  # a section's key given bare
                  for u in sorted(unknown) if u in {f.name for f in dataclasses.fields(h)}]
        close = {u: difflib.get_close_matches(u, names, n=1) or [n for n in nested if n.endswith(f".{u}")]
                 for u in sorted(unknown)}
        hint = "".join(f"; {where}{u}: did you mean {where}{c[0]}?" for u, c in close.items() if c)
        raise ValueError(f"unknown config keys in {where.rstrip('.') or 'config'}: {sorted(unknown)}{hint}; "
                         f"known: {sorted(names)}")
    kwargs = {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, val in values.items():
        hint = hints[key]
        if val is None and hint in _KINDS:  # an empty value (`--out_dir=`, `seed: null`)
            if hint is not str or defaults[key] != "":
                raise ValueError(f"{where}{key} is empty: it takes {_KINDS[hint]}"
                                 + (f" (default {defaults[key]!r})" if defaults[key] is not dataclasses.MISSING else ""))
            val = ""  # a text field whose empty value means none (data.val, init_from)
        if dataclasses.is_dataclass(hint):
            if not isinstance(val, dict):
                raise ValueError(f"{where}{key} must be a mapping")
            kwargs[key] = _build(hint, val, f"{where}{key}.", written)
        elif typing.get_origin(hint) is tuple and isinstance(val, list):
            kwargs[key] = tuple(val)
        elif hint is str:  # an override's text as typed; a bare true / false in a file as the text written
            val = _typed(val, f"{where}{key}", written)
            kwargs[key] = ("true" if val else "false") if isinstance(val, bool) else _scalar(hint, val, f"{where}{key}")
        else:
            kwargs[key] = _scalar(hint, val, f"{where}{key}")
    return cls(**kwargs)


@functools.cache
def _yaml_loader() -> type:
    """YAML's safe loader with YAML 1.2's booleans and numbers: only true / false (any case)
    are booleans, so ``--out_dir=off`` or ``name: no`` stay the text written; ``010`` is ten
    and ``7:30`` is text (YAML 1.1 read on, off, yes and no as booleans, a leading 0 as octal
    and colons as base 60); ``1e-4`` is a number (1.1 wanted a dot); ``100_000`` is one too."""
    import re  # noqa: PLC0415

    yaml = optional_module("yaml", "reading training configs", "pyyaml", "train")

    class Loader(yaml.SafeLoader):
        pass

    tags = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float")}
    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in tags]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                 list("-+0123456789"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                   r"|\.(?:nan|NaN|NAN))$"),
        list("-+.0123456789"))

    def integer(loader, node):  # digits may be grouped with underscores (100_000)
        text = loader.construct_scalar(node).replace("_", "")
        return int(text[2:], 8 if text[1] == "o" else 16) if text[:2] in ("0o", "0x") else int(text, 10)

    Loader.add_constructor("tag:yaml.org,2002:int", integer)
    return Loader


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _scalar(hint: Any, val: Any, name: str) -> Any:
    """``val`` checked against a plain ``int``/``float``/``bool``/``str`` field (an int is a
    float too); other fields take it as it is."""
    if hint not in _KINDS or val is None:  # None (an empty YAML value) as before: the field's reader decides
        return val
    ok = isinstance(val, hint) and not (hint is int and isinstance(val, bool))
    if hint is float and isinstance(val, int) and not isinstance(val, bool):
        return float(val)
    if hint is float and isinstance(val, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            val, ok = float(val), True
        except ValueError:
            pass
    if hint is float and ok and math.isnan(val):
        raise ValueError(f"{name} must be a number, got nan")
    if not ok:
        quote = f" (YAML read it as {type(val).__name__}: quote it in the file, '{val}')" if hint is str else ""
        raise ValueError(f"{name} must be {_KINDS[hint]}, got {val!r}{quote}")
    return val


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {dotted}: {k} is not a section")
    tree[keys[-1]] = value


CONFIGS = Path(__file__).parent / "configs"
"""The shipped training configs (installed with the package)."""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file into :class:`TrainConfig` and apply ``section.key=value``
    overrides (values parsed as YAML scalars/lists; a leading ``--`` is allowed).

    Raises:
        ValueError: unknown keys, malformed overrides or a missing file.
    """
    yaml = optional_module("yaml", "reading training configs", "pyyaml", "train")
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        shipped = CONFIGS / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
        if not p.is_file() and p.parent in (Path("."), Path("train/configs")) and shipped.is_file():
            p = shipped  # a shipped config by its name (image, audio, video) or its path in the repository
        if not p.is_file():
            names = ", ".join(sorted(c.stem for c in CONFIGS.glob("*.yaml") if not c.stem.startswith("accelerate")))
            raise ValueError(f"config file not found: {p} (the shipped ones, by name: {names}; in {CONFIGS})")
        try:
            tree = yaml.load(p.read_text(), Loader=_yaml_loader()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
        except UnicodeDecodeError:  # (a photo or a recording where the config goes)
            raise ValueError(f"{p} is not a text file: tvq train's first argument is a YAML config (such as "
                             "train/configs/image.yaml), and the data are named in it or as --data.train=FOLDER") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{p} holds {type(tree).__name__} {tree!r}, not a mapping of sections "
                             "(model:, data:, ...); see train/configs/ for examples")
    items, written = list(overrides or []), {}
    while items:
        item = items.pop(0).removeprefix("--")
        if item in ("-h", "help"):
            raise ValueError("the help of tvq train comes before the config: tvq train -h; its settings are the keys "
                             "of train/configs/*.yaml, given as --section.key=value (e.g. --optim.lr=1e-4)")
        if "=" not in item and items and not items[0].startswith("--"):
            item = f"{item}={items.pop(0)}"  # "--key value" as well as "--key=value"
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        written[key] = raw.strip()
        # model.quantizer.options is free-form: values are kept as parsed
        try:
            _set(tree, key, yaml.load(raw, Loader=_yaml_loader()))
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: its value is not valid YAML: {' '.join(str(e).split())}") from None
    model = tree.pop("model", {})
    quant = model.pop("quantizer", {}) if isinstance(model, dict) else {}
    sections = [("model", model), ("model.quantizer", quant)]
    if isinstance(quant, dict):
        if "options" in quant and quant["options"] is None:
            quant["options"] = {}  # (--model.quantizer.options= clears them)
        sections += [(f"model.quantizer.{k}", quant[k]) for k in ("options", "dynamic") if quant.get(k) is not None]
    for name, section in sections:
        if not isinstance(section, dict):
            raise ValueError(f"{name} must be a section of keys (model.backbone.channels=..., model.quantizer.kind=..., "
                             f"model.quantizer.options.codebook_size=...), got {section!r}; see train/configs/ for examples")
    cfg = _build(TrainConfig, tree, "", written)
    for key in ("modality", "name"):  # text fields of the model section: the text typed (2024, 2024-06-01; a bare
        if key in model and not isinstance(model[key], bool):  # true / false is no name: the model's check says so)
            model[key] = _typed(model[key], f"model.{key}", written)
    for part, key in ((cfg, "out_dir"), (cfg, "init_from"), (cfg.data, "train"), (cfg.data, "val"), (cfg.data, "stills")):
        setattr(part, key, os.path.expanduser(getattr(part, key)))  # the shell leaves ~ after "=" as it is
    cfg.model = TokenizerConfig.from_dict({**model, "quantizer": dataclasses.asdict(_build(QuantizerConfig, quant, "model.quantizer.", written))})
    check_config(cfg)
    return cfg


def _at_least(name: str, value: Any, least: float, *, below: float | None = None, kind: type = int) -> None:
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < least or (below is not None and value >= below):
        span = f"in [{least}, {below})" if below is not None else f">= {least}"
        raise ValueError(f"{name}={value!r}: expected {'a finite number' if kind is float else 'a whole number'} {span}")


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings a run cannot train with, or would silently ignore, naming the key.

    Raises:
        ValueError: the first such setting, with what it accepts.
    """
    for key in ("steps", "batch_size", "grad_accum", "log_every", "save_every"):
        _at_least(key, getattr(cfg, key), 1)
    _at_least("sample_every", cfg.sample_every, 0)
    _at_least("ema_decay", cfg.ema_decay, 0, below=1, kind=float)
    _at_least("max_minutes", cfg.max_minutes, 0, kind=float)
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={cfg.mixed_precision!r}: expected 'no', 'bf16' or 'fp16'")
    if cfg.mixed_precision == "fp16" and not _cuda():
        raise ValueError("mixed_precision='fp16' needs a CUDA GPU (on the CPU it would run in fp32 without a word): "
                         "use 'bf16' or 'no' here")
    d, loss, o = cfg.data, cfg.loss, cfg.optim
    for key in ("crop", "clip_frames", "max_frames"):
        _at_least(f"data.{key}", getattr(d, key), 1)
    for key in ("max_items", "max_pan", "crop_max"):
        _at_least(f"data.{key}", getattr(d, key), 0)
    if d.crop_max and cfg.model.modality == "audio":
        raise ValueError(f"data.crop_max={d.crop_max}: audio trains on segments (data.segment_seconds), not crops; "
                         "set --data.crop_max=0")
    if d.crop_max and d.crop_max < d.crop:
        raise ValueError(f"data.crop_max={d.crop_max}: it is below data.crop={d.crop}; set --data.crop_max=0 (one crop "
                         "size) or a side above data.crop")
    if cfg.model.modality == "video" and d.max_frames < d.clip_frames:
        raise ValueError(f"data.max_frames={d.max_frames} reads fewer frames per file than a training clip takes "
                         f"(data.clip_frames={d.clip_frames}): raise data.max_frames or lower data.clip_frames")
    _at_least("data.segment_seconds", d.segment_seconds, 1e-3, kind=float)
    _at_least("data.val_fraction", d.val_fraction, 0, below=1, kind=float)
    if not (isinstance(d.stills_fraction, (int, float)) and 0 <= d.stills_fraction <= 1):
        raise ValueError(f"data.stills_fraction={d.stills_fraction!r}: expected a share of the batch in [0, 1]")
    weights = ("l1", "l2", "perceptual", "mel", "stft", "quantizer", "adversarial", "feature_matching", "lecam")
    for key in weights:
        _at_least(f"loss.{key}", getattr(loss, key), 0, kind=float)
    _at_least("loss.disc_start", loss.disc_start, 0)
    _at_least("loss.lecam_decay", loss.lecam_decay, 0, below=1, kind=float)
    audio = cfg.model.modality == "audio"
    misplaced = [k for k in (("mel", "stft") if not audio else ("perceptual",)) if getattr(loss, k) > 0]
    if misplaced:
        article = "an" if cfg.model.modality[:1] in "aeiou" else "a"
        raise ValueError(f"loss.{misplaced[0]} does not apply to {article} {cfg.model.modality} model (mel and stft are audio terms, perceptual a pixel one): set it to 0")
    if not any(getattr(loss, k) > 0 for k in ("l1", "l2", "perceptual", "mel", "stft")):
        raise ValueError("every reconstruction weight (loss.l1, l2, perceptual, mel, stft) is 0: nothing would train "
                         "the decoder; set at least one above 0")
    for key in ("lr", "disc_lr"):
        _at_least(f"optim.{key}", getattr(o, key), 1e-12, kind=float)
    for key in ("weight_decay", "grad_clip"):
        _at_least(f"optim.{key}", getattr(o, key), 0, kind=float)
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    # batches are drawn from hash((seed, step, rank)): ints hash modulo 2^61 - 1, and hash(-1) == hash(-2)
    _at_least("seed", cfg.seed, 0, below=sys.hash_info.modulus)
    betas = o.betas if isinstance(o.betas, (tuple, list)) else ()
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise ValueError(f"optim.betas={o.betas!r}: expected two numbers in [0, 1), such as [0.5, 0.9]")
    if not 0 <= o.decay_steps <= cfg.steps:
        raise ValueError(f"optim.decay_steps={o.decay_steps} must lie in [0, steps={cfg.steps}]: the decay "
                         "runs over the last decay_steps of the run")


def _cuda() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
