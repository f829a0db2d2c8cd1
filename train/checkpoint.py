"""Trainer checkpoints: safetensors for every tensor, JSON for everything else,
written to a temporary folder and renamed into place.

Layout of ``<out_dir>/checkpoint/``:
- ``model/``: the tokenizer to release (EMA weights when kept), ``from_pretrained``-able;
- ``state.safetensors``: generator, EMA, discriminator, optimiser moments, RNG states;
- ``state.json``: step, the full config, and the non-tensor optimiser/scheduler state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenizers_vq.distributed import all_reduce_sum_
from tokenizers_vq.io import atomic_write, check_can_write, usual_mode

TENSOR = "__tensor__:"


def flatten(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors`` (keyed by its path)
    and return the JSON-able remainder with ``"__tensor__:<key>"`` placeholders."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return TENSOR + prefix
    if isinstance(obj, dict):
        return {str(k): flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, str) and obj.startswith(TENSOR):
        return tensors[obj[len(TENSOR) :]]
    if isinstance(obj, dict):
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer ``state_dict`` after JSON (integer parameter ids come back as ints), its
    moments checked against ``optimizer``'s parameters (``load_state_dict`` takes a moment of
    another shape, which the first step then fails on)."""
    state = dict(state)
    state["state"] = {int(k): v for k, v in state["state"].items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(ids) != len(params):
        raise ValueError(f"the optimizer state holds {len(ids)} parameters, the model {len(params)}")
    for i, p in zip(ids, params):
        bad = [k for k, v in state["state"].get(i, {}).items() if isinstance(v, Tensor) and v.ndim and v.shape != p.shape]
        if bad:
            raise ValueError(f"the optimizer's {bad[0]} of parameter {i} has shape {tuple(state['state'][i][bad[0]].shape)}, "
                             f"the parameter {tuple(p.shape)}")
    return state


def save_checkpoint(directory: Path, parts: dict[str, Any], meta: dict[str, Any], model_dir_writer) -> Path:
    """Write a checkpoint atomically.

    Args:
        directory: final checkpoint folder (replaced as a whole).
        parts: named nested state (state dicts, optimiser states, RNG tensors).
        meta: JSON-able fields (step, config).
        model_dir_writer: ``f(path)`` that writes the release tokenizer folder.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    from safetensors import SafetensorError  # noqa: PLC0415

    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(".checkpoint.*"):  # a save killed part-way left it
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=directory.parent))
    try:
        tensors: dict[str, Tensor] = {}
        structure = {name: flatten(value, name, tensors) for name, value in parts.items()}
        try:
            save_file(tensors, tmp / "state.safetensors")
            (tmp / "state.json").write_text(json.dumps({**meta, "structure": structure}, indent=1))
            model_dir_writer(tmp / "model")
        except (SafetensorError, OSError) as e:  # a full disk, say: one OSError naming the folder, whichever write
            kept = "the last one is kept" if find_checkpoint(directory) else "no earlier one exists"
            raise OSError(f"cannot write the checkpoint in {directory.parent} ({e}); {kept}") from None
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp and the tensor writer make them private
            path.chmod(usual_mode(path))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def find_checkpoint(directory: Path) -> Path | None:
    """The checkpoint to resume from (``.old`` if a crash hit between the renames); ``None``
    where there is none.

    Raises:
        ValueError: a checkpoint folder lacking one of its state files (a run would start
            over from step 0 and write over its model).
    """
    for cand in (directory, directory.with_name(directory.name + ".old")):
        if (cand / "state.json").is_file() and (cand / "state.safetensors").is_file():
            return cand
    for cand in (directory, directory.with_name(directory.name + ".old")):
        if cand.exists():
            missing = [f for f in ("state.json", "state.safetensors") if not (cand / f).is_file()]
            raise ValueError(f"incomplete checkpoint {cand}: {' and '.join(missing)} missing, so it cannot be resumed; "
                             "put the file back, or move the folder away to train from step 0 (its model/ folder "
                             "can warm-start the new run: --init_from)")
    return None


def load_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(parts, meta)`` as given to :func:`save_checkpoint`.

    Raises:
        ValueError: a file that is not what a save writes (:func:`damaged`)."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    with damaged(directory, SafetensorError, OSError):
        meta = json.loads((directory / "state.json").read_text())
        tensors = load_file(directory / "state.safetensors")
        structure = meta.pop("structure")
        int(meta["step"]), dict(meta["config"]["model"])  # (read before anything is restored)
        return {k: unflatten(v, tensors) for k, v in structure.items()}, meta


@contextlib.contextmanager
def damaged(directory: Path, *errors: type[BaseException]):
    """Reading or restoring checkpoint ``directory``: ``errors`` and the errors of a state of
    other keys, types or shapes (``KeyError``, ``TypeError``, ``AttributeError``, ``ValueError``,
    torch's ``RuntimeError``) become one ``ValueError`` naming it and the ways on."""
    try:
        yield
    except (*errors, KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError) or "CUDA" in str(e):  # the device's trouble, not the files'
            raise
        raise ValueError(f"corrupt checkpoint {directory} ({type(e).__name__}: {' '.join(str(e).split())[:300]}): move it away to resume "
                         f"from {directory.name}.old if there is one, or train in a new out_dir with --init_from "
                         f"{directory / 'model'}") from e


def rng_state() -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def state_hashes(module: torch.nn.Module, rank: int, world: int) -> list[str]:
    """SHA-256 of ``module``'s state on every rank (equal when it is bitwise identical),
    gathered to all ranks; each rank prints its own."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    print(f"rank {rank}: codebook sha256 {digest}")
    if world == 1:
        return [digest]
    import torch.distributed as dist  # noqa: PLC0415

    out: list[str] = [""] * world
    dist.all_gather_object(out, digest)
    return out


def truncate_log(log: Path, step: int) -> None:
    """Drop the lines of ``log`` (``metrics.jsonl``) of steps after ``step`` (all, at 0),
    written before a kill and written again by the resumed run, so each step has one line."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                break
        except json.JSONDecodeError:  # a line cut by the kill
            break
        keep.append(line)
    if len(keep) < len(lines):
        tmp = log.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(log)


def set_aside_earlier_run(out_dir: Path) -> str:
    """Before a run starts at step 0 in ``out_dir`` (no checkpoint there): an earlier run's
    ``metrics.jsonl``, summary and codebook hashes (its checkpoint moved away, or a run killed
    before its first one) are renamed ``NAME.<n>`` (the first free ``n``), so nothing written is
    lost; the note naming them, or ``""`` when there were none."""
    names = [n for n in ("metrics.jsonl", SUMMARY, HASHES) if (out_dir / n).is_file() and (out_dir / n).stat().st_size]
    n = 1
    while any((out_dir / f"{name}.{n}").exists() for name in names):
        n += 1
    for name in names:
        os.replace(out_dir / name, out_dir / f"{name}.{n}")
    return (f"{out_dir} held an earlier run's {', '.join(names)} and no checkpoint: this run starts at step 0, "
            f"those kept as {', '.join(f'{name}.{n}' for name in names)}") if names else ""


RUN_LENGTH_KEYS = ("steps", "max_minutes", "log_every", "save_every", "sample_every", "out_dir", "init_from",
                   "init_quantizer")
"""Settings a resumed run may change without a notice: how long it runs and how often it
writes (``steps`` also places a learning-rate decay over the last ``optim.decay_steps``);
the others are named when they differ from the checkpoint's."""


def process_change(meta: dict[str, Any], processes: int, batch_size: int) -> list[str]:
    """``processes: old -> new`` when a checkpoint saved by another number of processes
    resumes (``batch_size`` counts per process, so a step's batch changes with it)."""
    was = meta.get("processes", processes)  # (a checkpoint that did not record it: taken as the same)
    return [] if was == processes else [f"processes: {was} -> {processes} (a step's batch: {was * batch_size} -> "
                                        f"{processes * batch_size})"]


def changed_settings(saved: dict[str, Any], now: dict[str, Any], prefix: str = "",
                     defaults: dict[str, Any] | None = None) -> list[str]:
    """``key: old -> new`` for each setting (outside the model section and
    :data:`RUN_LENGTH_KEYS`) whose value differs between two config dicts; a key the saved
    config lacks (a setting added since it was written) counts as its value in ``defaults``."""
    out, defaults = [], defaults or {}
    for key in sorted(set(saved) | set(now)):
        if not prefix and key in ("model", *RUN_LENGTH_KEYS):
            continue
        old, new = saved.get(key, defaults.get(key)), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += changed_settings(old, new, f"{prefix}{key}.", defaults.get(key))
        elif old != new and not (isinstance(old, list) and isinstance(new, tuple) and old == list(new)):
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


SUMMARY, HASHES = "train_summary.json", "codebook_hashes.json"


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    """A finished run's ``train_summary.json`` and ``codebook_hashes.json``, each written whole."""
    for name, value in ((HASHES, summary["codebook_hashes"]), (SUMMARY, summary)):
        atomic_write(out_dir / name, lambda tmp, v=value: Path(tmp).write_text(json.dumps(v, indent=1)))


def read_summary(out_dir: Path, steps: int) -> dict[str, Any]:
    """What :func:`write_summary` left in ``out_dir``; ``{"steps": steps}`` where that file is
    missing or damaged (its numbers are a record of the run, not state the run needs)."""
    try:
        summary = json.loads((out_dir / SUMMARY).read_text())
        return summary if isinstance(summary, dict) else {"steps": steps}
    except (OSError, ValueError):
        return {"steps": steps}


def stop_if_nonfinite(nonfinite: Tensor, num_processes: int, step: int, checkpoint: Path) -> None:
    """Stop a run whose loss was NaN or Inf at some step (``nonfinite``, a flag kept on the
    device), before it saves over its last good checkpoint; the ranks of a multi-process run
    decide together (one all-reduce)."""
    bad = nonfinite.float().reshape(1)
    if num_processes > 1:
        bad = all_reduce_sum_(bad)
    if bool(bad > 0):
        kept = find_checkpoint(checkpoint)
        raise FloatingPointError(
            f"the training loss or weights became NaN or Inf by step {step}; nothing after it was saved "
            + (f"(the checkpoint in {kept} is kept)" if kept else "(no checkpoint had been written)")
            + ": lower optim.lr, set optim.grad_clip, or look for broken items in the data")


def check_run_folder(out_dir: Path) -> None:
    """Refuse an ``out_dir`` the run could not write, before any work (not after the run)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file: name a folder for the run")
    check_can_write(out_dir / "metrics.jsonl")  # OSError (permissions, read-only) names the folder


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C at the end of a step, after saving it (the message says where)."""


@contextlib.contextmanager
def interrupt_at_step_end(enabled: bool) -> Iterator[Callable[[], bool]]:
    """Inside the block, Ctrl-C (SIGINT) is noted instead of raised, for the loop to read at the
    end of its step (the function yielded) and save a whole step; a second Ctrl-C raises at
    once. Only where ``enabled`` (one process: ranks would note it at different steps), in
    the main thread (where Python runs signal handlers) and where SIGINT is not ignored (``nohup``,
    a job started in the background); elsewhere nothing changes."""
    pressed: list[bool] = []
    if (not enabled or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield lambda: False
        return

    def note(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        print("\ninterrupted: saving at the end of this step (Ctrl-C again to stop at once)", flush=True)

    before = signal.signal(signal.SIGINT, note)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, before)
