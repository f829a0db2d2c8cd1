"""Input checks that wait for a sync the caller makes anyway.

An encode refuses inputs and latents holding NaN or Inf. Deciding that needs a value from
the GPU, so each check waits for the work queued before it: an export that queues the next
batch's encode before copying the last batch's codes back would wait for that batch at the
start of the next one, and the two never overlap. Inside :func:`deferred_checks` those
checks queue their value instead; :meth:`DeferredChecks.raise_if_failed`, called once the
caller has waited for the results anyway, raises the first failure with the message it
would have raised at once. :meth:`Tokenizer.encode` runs its checks at its end
(:func:`checked_at_end`): one wait, once all its work is queued. Elsewhere, outside a block,
a check runs at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

_PENDING: ContextVar[DeferredChecks | None] = ContextVar("tokenizers_vq_deferred_checks", default=None)


class DeferredChecks:
    """The checks queued inside one :func:`deferred_checks` block."""

    def __init__(self) -> None:
        self._checks: list[tuple[Tensor, Callable[[Tensor], None]]] = []

    def to_host(self) -> None:
        """Copy the queued values to the CPU without waiting (stream-ordered, into pinned memory);
        the caller must wait for the stream (e.g. an event recorded after this) before
        :meth:`raise_if_failed`."""
        self._checks = [(value.to("cpu", non_blocking=True), verdict) for value, verdict in self._checks]

    def raise_if_failed(self) -> None:
        """Run the queued checks in order (each waits for its value): the first failure raises."""
        checks, self._checks = self._checks, []
        for value, verdict in checks:
            verdict(value)


@contextlib.contextmanager
def deferred_checks() -> Iterator[DeferredChecks]:
    """Checks made inside the block (in this thread or task) are queued on the returned object."""
    checks = DeferredChecks()
    token = _PENDING.set(checks)
    try:
        yield checks
    finally:
        _PENDING.reset(token)


def pending() -> bool:
    """Whether checks are being queued (inside :func:`deferred_checks` in this thread or task)."""
    return _PENDING.get() is not None


def checked_at_end() -> contextlib.AbstractContextManager:
    """A block whose checks run once it ends (one wait, after all its work is queued), not
    each where it is made; inside an outer :func:`deferred_checks` block they stay queued
    there. When the block raises, its own checks run first: a refused input is the error to
    report, not what its values did to the work after the check. Nothing while
    ``torch.compile`` traces (the checks are left out there)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _checked_at_end()


@contextlib.contextmanager
def _checked_at_end() -> Iterator[None]:
    outer = _PENDING.get()
    with contextlib.nullcontext(outer) if outer is not None else deferred_checks() as checks:
        start = len(checks._checks)
        try:
            yield
        except Exception:
            mine, checks._checks[start:] = checks._checks[start:], []
            for value, verdict in mine:
                verdict(value)
            raise
    if outer is None:
        checks.raise_if_failed()


def check(value: Tensor, verdict: Callable[[Tensor], None]) -> None:
    """``verdict(value)`` (which raises on a failure) now, or queued inside :func:`deferred_checks`."""
    pending = _PENDING.get()
    if pending is None:
        verdict(value)
    else:
        pending._checks.append((value, verdict))
