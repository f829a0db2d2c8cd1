"""What a causal convolution carries from one call to the next while a signal goes through it
in pieces (an audio stream's pushes, a long video clip's time chunks), kept per thread.

A conv run in pieces pads each piece with the last inputs of the one before instead of
zeros. That state belongs to the run, not to the module: it lives in the running thread's
table (:func:`running`), so two streams of one tokenizer in two threads, or a stream in one
thread and an offline encode in another, never see each other's inputs. Under
``torch.compile`` no run is active (the compiled graph never looks): a stream refuses a
compiled model, and a video clip runs compiled stages over the whole clip.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


class Carry:
    """One conv's state in one run: its last ``inputs`` (None before the first piece) and,
    for the audio conv on a channels-last input, its weight laid out once for the run."""

    __slots__ = ("inputs", "weight")

    def __init__(self) -> None:
        self.inputs: Tensor | None = None
        self.weight: Tensor | None = None


_LOCAL = threading.local()


def compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs compiled (``torch.compile(module)`` or ``module.compile()``): its
    graph does not look up a run's state, so it cannot run in pieces."""
    return getattr(module, "_compiled_call_impl", None) is not None or type(module).__name__ == "OptimizedModule"


def of(module: nn.Module) -> Carry | None:
    """``module``'s state in this thread's current run, or None outside one."""
    if torch.compiler.is_compiling():
        return None
    runs = getattr(_LOCAL, "runs", None)
    return None if runs is None else runs.get(module)


@contextlib.contextmanager
def running(modules: Iterable[nn.Module], state: dict[nn.Module, Carry] | None = None) -> Iterator[dict[nn.Module, Carry]]:
    """Inside the block, in this thread, each of ``modules`` carries its inputs from one call
    to the next, starting from ``state`` (a run's table, from an earlier block) or from
    nothing; yields a new table, which holds the state after the block (``state`` stays as it
    was: a block that fails leaves the run where it was before it)."""
    table = {m: Carry() for m in modules}
    for m, kept in (state or {}).items():
        table[m].inputs, table[m].weight = kept.inputs, kept.weight
    before = getattr(_LOCAL, "runs", None)
    _LOCAL.runs = {**before, **table} if before else table
    try:
        yield table
    finally:
        _LOCAL.runs = before
