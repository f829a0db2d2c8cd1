"""The ``tvq`` command: command ``x-y`` runs ``_x_y`` here; the commands and their options
are in :mod:`tokenizers_vq.cli_args`."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from tokenizers_vq.cli_args import parse
from tokenizers_vq.errors import EMPTY_NAME, MissingDependency, WriteError, show_warning_line, unused_option
from tokenizers_vq.runtime import keep_freed_memory


def _demo(args: argparse.Namespace) -> int:
    from tokenizers_vq.demo import run_demo  # noqa: PLC0415

    results = run_demo(args.image, args.out, steps=args.steps, patch=args.patch)
    print(f"{'quantizer':<18} {'PSNR dB':>8} {'bits/px':>8} {'usage':>7}")
    for name, r in results.items():
        print(f"{name:<18} {r['psnr_db']:8.2f} {r['bits_per_pixel']:8.3f} {r['usage']:7.1%}")
    print(f"wrote {args.out}/reconstruction.png, codebook_usage.png, metrics.json")
    return 0


def _load_model(args: argparse.Namespace, default: str | None = None):
    import torch  # noqa: PLC0415

    from tokenizers_vq.tokenizer import Tokenizer  # noqa: PLC0415

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Tokenizer.from_pretrained(args.model or default).to(device)


def _encode(args: argparse.Namespace) -> int:
    from tokenizers_vq.media import MAX_PIXELS, uncoded_parts  # noqa: PLC0415
    from tokenizers_vq.tokens import default_model_name, encode_files  # noqa: PLC0415

    if args.max_pixels is not None and args.max_pixels < 0:
        raise ValueError(f"--max-pixels {args.max_pixels}: expected a pixel count >= 1, or 0 for no limit")
    default = None if args.model else default_model_name(args.files)
    tok = _load_model(args, default)
    limit = MAX_PIXELS if args.max_pixels is None else args.max_pixels or sys.maxsize  # (0: none, Pillow's guard too)
    unused_option("--max-pixels", args.max_pixels is not None and not tok.media.has_pixels, "audio has no pixels")
    print(f"wrote {encode_files(tok, args.files, args.output, max_pixels=limit)}")
    for note in uncoded_parts(tok.modality, args.files):
        print(f"tvq: note: {note}", file=sys.stderr)
    return 0


def _decode(args: argparse.Namespace) -> int:
    from tokenizers_vq.tokens import OtherModelWarning, decode_file, load_tokens  # noqa: PLC0415

    meta, _ = load_tokens(args.tokens)
    tok = _model_for_tokens(args, meta["model_id"], meta["modality"], meta)
    with warnings.catch_warnings():  # decode_file warns after its refusals, before decoding
        warnings.simplefilter("always", OtherModelWarning)
        written = decode_file(tok, args.tokens, args.output, args.overwrite)
    print("\n".join(f"wrote {path}" for path in written) or f"wrote nothing: {args.tokens} holds no items")
    return 0


def _model_for_tokens(args: argparse.Namespace, model_id: object, modality: object, meta: dict | None = None):
    """``--model``, else the embedded model that wrote ``model_id``'s tokens (refused: none, or ``meta`` another's)."""
    import json  # noqa: PLC0415

    from tokenizers_vq.export_record import same_weights  # noqa: PLC0415
    from tokenizers_vq.tokenizer import DEFAULT_FOR_MODALITY, PRETRAINED  # noqa: PLC0415
    from tokenizers_vq.tokens import check_compatible  # noqa: PLC0415

    if args.model:
        return _load_model(args)
    default = next((name for name, folder in PRETRAINED.items() if (folder / "config.json").is_file()
                    and json.loads((folder / "config.json").read_text()).get("name") == model_id),
                   DEFAULT_FOR_MODALITY.get(str(modality), "image"))
    tok = _load_model(args, default)
    if model_id != tok.config.name:
        raise ValueError(f"{args.tokens} was written by model {model_id!r}, which is not one of the embedded models "
                         f"({', '.join(PRETRAINED)}); pass --model DIR of the model that wrote it")
    if (weights := (meta or {}).get("model_sha256")) is not None:
        check_compatible(meta, tok, Path(args.tokens))  # tokens of other codes: that refusal first
        if not same_weights(weights, tok):
            raise ValueError(f"{args.tokens} was written by a model named {model_id!r} with other weights than the "
                             f"embedded {default!r} model (one trained from its config, or an earlier release): pass "
                             f"--model DIR of the model that wrote it, or --model {default} to decode anyway")
    return tok


def _default_for_folder(folder: str, skip: set | None = None) -> str:
    """The embedded model for ``folder`` with no ``--model``: ``image`` for photos, else its files' one modality
    (ValueError: audio and video; clips' frames are video); files under a folder of ``skip`` skipped."""
    from tokenizers_vq.media import media_in_folder  # noqa: PLC0415
    from tokenizers_vq.tokenizer import DEFAULT_FOR_MODALITY  # noqa: PLC0415

    held = media_in_folder(folder, skip)
    if held is None or held["image"]:
        return "image"  # photos; or a tar source, or a missing folder (the listing names it)
    kinds = [m for m in ("audio", "video") if held[m]]
    if len(kinds) > 1:
        raise ValueError(f"{folder} holds audio and video files; a model codes one modality: pass --model speech "
                         "or --model video (or a model directory)")
    return DEFAULT_FOR_MODALITY[kinds[0]] if kinds else "image"


def _train(args: argparse.Namespace) -> int:
    from tokenizers_vq.train.config import load_config  # noqa: PLC0415
    from tokenizers_vq.train.trainer import Trainer  # noqa: PLC0415

    trainer = Trainer(cfg := load_config(args.config, args.overrides))
    summary = trainer.train()  # on an exception the process exits and the launcher stops its peers
    trainer.close()
    if summary.get("already_trained"):
        trainer.acc.print(f"{cfg.out_dir} is trained to step {summary['steps']} already (steps={cfg.steps}): "
                          "nothing to do; raise --steps to train further")
        return 0
    aside = f"; {summary['sample_seconds']:.0f} s of it writing samples" if summary["sample_seconds"] >= 1 else ""
    trainer.acc.print(f"trained to step {summary['steps']} in {summary['seconds']:.0f} s ({summary['steps_per_s']:.2f} "
                      f"steps/s{aside}); checkpoint: {cfg.out_dir}/checkpoint/model")  # (once, not per process)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tokenizers_vq.eval.report import write_report  # noqa: PLC0415
    from tokenizers_vq.media import left_out, list_media, outputs_under, uncoded_parts  # noqa: PLC0415

    for name, value in (("--max-items", args.max_items), ("--max-frames", args.max_frames)):
        if value < 0:
            raise ValueError(f"{name} {value}: expected a count >= 1, or 0 for all")
    if (out := Path(args.out).resolve()) in (data := Path(args.data).resolve(), *data.parents):  # all skipped as its own
        raise ValueError(f"--out {args.out} holds --data {args.data}: write the report elsewhere, e.g. --out {data.name}_eval")
    skip = {out, *outputs_under(args.data)}  # not the samples of runs or pictures of reports inside it
    tok = _load_model(args, None if args.model else _default_for_folder(args.data, skip=skip))
    files = [f for f in list_media(args.data, tok.modality) if skip.isdisjoint(f.resolve().parents)]
    files = files[: args.max_items] if args.max_items else files
    for note in (notes := left_out(args.data, tok.modality, skip) + uncoded_parts(tok.modality, files)):
        print(note, file=sys.stderr)
    name = args.model or f"{tok.config.name} (embedded default)"
    result = write_report(tok, files, args.out, name, lpips_weights=args.lpips_weights,
                          lpips_heads=args.lpips_heads, fid_weights=args.fid_weights, baselines=args.baselines,
                          max_frames=args.max_frames or None, notes=notes)
    for k, v in result["summary"].items():
        print(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    for k, v in [*result["skipped"].items(), *result.get("baselines", {}).get("skipped", {}).items(),
                 *(("left out", entry["error"]) for entry in result["failed"])]:
        print(f"{k:>22}: {v}")
    print(f"wrote {Path(args.out) / 'report.md'}, metrics.json and pictures")
    return 0


def _export(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415
    from tokenizers_vq import distributed  # noqa: PLC0415
    from tokenizers_vq.export import export_dataset  # noqa: PLC0415
    from tokenizers_vq.export_record import RECORD  # noqa: PLC0415
    from tokenizers_vq.media import left_out, list_media, outputs_under  # noqa: PLC0415
    from tokenizers_vq.webdataset import is_tar_source, list_tar_samples  # noqa: PLC0415

    for name, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--shard-items", args.shard_items, 1), ("--resize", args.resize, 8)):
        if value is not None and value < least:
            raise ValueError(f"{name} {value}: expected a whole number >= {least}")
    device = distributed.init_from_env(use_cuda=args.device != "cpu")  # several ranks: accelerate launch, torchrun
    if args.device is None and device.type == "cuda":
        args.device = str(device)
    try:
        error, notes = None, []
        try:  # a rank that fails here stops the others (they would wait for it in the export)
            skip = set() if (tar := is_tar_source(args.data)) else outputs_under(args.data)  # runs', reports' pictures
            tok = _load_model(args, None if args.model else _default_for_folder(args.data, skip=skip))
            inputs = (list_tar_samples(args.data, tok.modality, notes) if tar
                      else [f for f in list_media(args.data, tok.modality) if skip.isdisjoint(f.resolve().parents)])
        except Exception as e:  # noqa: BLE001  (raised below on every rank)
            error = e
        distributed.agree(error)
        for note in [*notes, *left_out(args.data, tok.modality, skip)] if distributed.rank_and_world()[0] == 0 else ():
            print(note, file=sys.stderr)
        out = Path(args.out)  # an earlier run of this export finished shards there: they are kept
        resumed = not args.overwrite and (out / RECORD).is_file() and any(out.glob("shard_*.json"))
        start = time.perf_counter()
        manifest = export_dataset(tok, inputs, args.out, args.shard_items, args.batch_size, args.overwrite, args.workers,
                                  args.precision, args.data, args.resize, args.center_crop)
        secs = time.perf_counter() - start
        rank, world = distributed.rank_and_world()
    finally:
        distributed.leave()
    if rank != 0:
        return 0
    print(f"{world} ranks: " if world > 1 else "", end="")
    total = f"{len(manifest['shards'])} shards, {manifest['num_items']} items, {manifest['num_tokens']} tokens"
    if resumed:
        print(f"finished the export to {args.out} in {secs:.1f} s: {total}; the shards an earlier run had written "
              "were kept, not encoded again")
    else:
        print(f"wrote {total} to {args.out} in {secs:.1f} s ({manifest['num_items'] / secs:.1f} items/s, "
              "files read and decoded included)")
    return 0


def _prior(args: argparse.Namespace) -> int:
    from tokenizers_vq.prior import PriorConfig  # noqa: PLC0415
    from tokenizers_vq.train.prior import PriorTrainConfig, check_model, sample_images, train_prior  # noqa: PLC0415

    for name, value in (("--steps", args.steps), ("--window", args.window), ("--batch-size", args.batch_size),
                        ("--layers", args.layers), ("--width", args.width)):
        if value < 1:
            raise ValueError(f"{name} {value}: expected a whole number >= 1")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k}: expected a count >= 1, or 0 for every token")
    if not 0 <= args.max_minutes < float("inf"):
        raise ValueError(f"--max-minutes {args.max_minutes}: expected minutes > 0, or 0 for no limit")
    from tokenizers_vq.token_dataset import read_json  # noqa: PLC0415

    manifest_path = Path(args.tokens) / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{args.tokens} is not a finished export (no manifest.json): run tvq export first")
    manifest = read_json(manifest_path, "shards")
    tok = _model_for_tokens(args, manifest.get("model_id"), manifest.get("modality"))
    if (note := check_model(args.tokens, manifest, tok)) is not None:
        if not args.model:  # the embedded model taken for the one that wrote them: refused, as decode refuses it
            raise ValueError(note)
        print(f"tvq: warning: {note}", file=sys.stderr)
    unused_option("--top-k", args.top_k and tok.modality != "image", "it samples the pictures of an image export only")
    heads = max(h for h in range(1, max(1, args.width // 64) + 1) if args.width % h == 0)  # about 64 wide, dividing it
    cfg = PriorTrainConfig(export_dir=args.tokens, out_dir=args.out, window=args.window, steps=args.steps,
                           batch_size=args.batch_size, max_minutes=args.max_minutes,
                           prior=PriorConfig(n_layer=args.layers, n_embd=args.width, n_head=heads))
    prior, summary = train_prior(cfg, str(next(tok.parameters()).device))
    stopped = f" (--max-minutes stopped it at step {summary['steps']} of {args.steps})" if summary["steps"] < args.steps else ""
    print(f"validation {summary['val_nats_per_token']:.3f} nats/token vs {summary['unigram_val_nats_per_token']:.3f} "
          f"for the training codes' unigram; the prior is in {args.out} (TokenPrior.load){stopped}")
    if tok.modality == "image":
        sample_images(prior, tok, 8, args.window, Path(args.out) / "samples.png", top_k=args.top_k)
        print(f"wrote {Path(args.out) / 'samples.png'}")
    return 0


def _example_photo(args: argparse.Namespace) -> int:
    from tokenizers_vq.media import bundled_photo  # noqa: PLC0415

    print(bundled_photo())
    return 0


def _check_device(device: str | None) -> None:
    """Refuse a ``--device`` this machine does not have, naming what it has."""
    if device is None:
        return
    import torch  # noqa: PLC0415

    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is not None and dev.type == "cpu":
        return
    if dev is None or dev.type != "cuda":
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {device}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                         "leave out --device (or give --device cpu)")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        _check_device(getattr(args, "device", None))
        given = [getattr(args, k, None) for k in ("files", "output", "tokens", "data", "out", "model", "init_from")]
        named = [p for v in given for p in (v if isinstance(v, list) else [v])]
        if "-" in named:
            raise ValueError("'-' (standard input or output) is not supported: name a file or folder")
        if "" in named:  # (a command substitution that printed nothing) not read as the folder "."
            raise ValueError(EMPTY_NAME)
        with warnings.catch_warnings():
            warnings.showwarning = show_warning_line
            return globals()["_" + args.command.replace("-", "_")](args)  # tvq example-photo: _example_photo
    except (ValueError, MissingDependency) as e:
        print(f"tvq: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # the machine's side: a folder that cannot be made, a full disk
        print(f"tvq: error: {e.strerror}", file=sys.stderr)
        return 1
    except (OSError, FloatingPointError) as e:  # a path that is not what it must be; a run that diverged
        print(f"tvq: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # (training's says where it saved)
        again = {"export": "an export resumes", "train": "training resumes from its last checkpoint"}.get(args.command)
        print(f"tvq: interrupted (files already written are complete{f'; {again} when run again' if again else ''})"
              if not str(e) else f"tvq: interrupted ({e})", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``tvq`` console command: a process of its own, so it keeps freed memory in the heap
    (CPU encodes 1.5x faster; :mod:`tokenizers_vq.runtime`). One rank of several ends with ``os._exit``
    once its streams are flushed (gloo's threads sometimes aborted the interpreter's own shutdown)."""
    keep_freed_memory()
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as their bytes, as ls does
        if hasattr(stream, "reconfigure"):  # (a strict UTF-8 locale failed on them after the work was done)
            stream.reconfigure(errors="surrogateescape")
    code = main()
    from tokenizers_vq.distributed import launched_as_ranks  # noqa: PLC0415  (torch.distributed: not at import)

    if launched_as_ranks():
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
