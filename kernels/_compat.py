"""Compatibility shim for Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into loop
bounds with ``int(array)``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays
can be converted to Python scalars"), so any ``range(0, D, BLOCK)`` with a runtime
bound fails. Under the interpreter only, we make that conversion ``int(array.item())``.
Compiled (GPU) kernels are untouched.
"""

from __future__ import annotations

import triton


def patch_interpreter() -> None:
    """Idempotent; a no-op unless Triton runs in interpreter mode."""
    if not triton.knobs.runtime.interpret:
        return
    from triton.runtime import interpreter  # noqa: PLC0415

    original = interpreter._patch_lang_tensor
    if getattr(original, "_tvq_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._tvq_patched = True
    interpreter._patch_lang_tensor = patched


patch_interpreter()
