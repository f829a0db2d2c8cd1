"""The training step's kernels compile for a Hopper GPU on a machine without one.

The interpreter (``TRITON_INTERPRET=1``, the CPU checks of ``test_nearest.py``) runs Python on
NumPy arrays, so it accepts code the compiler refuses (a loop-carried variable whose shape
changes in the loop runs there). Here each kernel goes through Triton's compiler down to a
cubin for sm_90, for every variant of its compile-time switches.
"""

from __future__ import annotations

import itertools

import pytest

triton = pytest.importorskip("triton")


def _compile(fn, signature: dict, constexprs: dict) -> None:
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"


def _needs_cuda_backend():
    try:
        from triton.backends import backends  # noqa: PLC0415
    except ImportError:
        pytest.skip("this Triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")


F32, I32, I64, C = "*fp32", "i32", "*i64", "constexpr"


def test_ema_update_kernels_compile_for_sm90():
    _needs_cuda_backend()
    from tokenizers_vq.kernels import ema  # noqa: PLC0415

    _compile(ema._ema_partials_kernel,
             {"COUNTS": F32, "SUMS": F32, "CS": F32, "PART": F32, "K": I32, "D": I32, "w": "fp32",
              "threshold": "fp32", "BLOCK_K": C, "BLOCK_D": C}, {"BLOCK_K": 32, "BLOCK_D": 64})
    scalars = {name: "fp32" for name in ("w", "eps", "keps", "threshold", "reset")}
    for restart, cosine in itertools.product((True, False), (True, False)):
        _compile(ema._ema_apply_kernel,
                 {"COUNTS": F32, "SUMS": F32, "CS": F32, "ES": F32, "EMBED": F32, "X": F32, "OFFSET": I64, "PART": F32,
                  "METRICS": F32, "RESTARTS": I64, "K": I32, "D": I32, "N": I32, "STRIDE": I32, "P": I32, "sxn": I32, "sxd": I32,
                  **scalars, "RESTART": C, "COSINE": C, "BLOCK_K": C, "BLOCK_D": C, "BLOCK_P": C},
                 {"RESTART": restart, "COSINE": cosine, "BLOCK_K": 32, "BLOCK_D": 64, "BLOCK_P": 64})


def test_commit_kernels_compile_for_sm90():
    _needs_cuda_backend()
    from tokenizers_vq.kernels import commit  # noqa: PLC0415

    _compile(commit._commit_fwd_kernel,
             {"X": F32, "C": F32, "IDX": I64, "Q": F32, "PART": F32, "N": I32, "D": I32, "sxn": I32, "sxd": I32,
              "scale": "fp32", "BLOCK_N": C, "BLOCK_D": C}, {"BLOCK_N": 32, "BLOCK_D": 128})
    for has_g in (True, False):
        _compile(commit._commit_bwd_kernel,
                 {"G": F32, "X": F32, "C": F32, "IDX": I64, "GLOSS": F32, "GX": F32, "N": I32, "D": I32, "sxn": I32,
                  "sxd": I32, "sgn": I32, "sgd": I32, "scale2": "fp32", "HAS_G": C, "BLOCK_N": C, "BLOCK_D": C},
                 {"HAS_G": has_g, "BLOCK_N": 32, "BLOCK_D": 128})


def test_segment_kernels_compile_for_sm90():
    _needs_cuda_backend()
    from tokenizers_vq.kernels import segment  # noqa: PLC0415

    for keys in ("*i16", "*i32", "*i64"):
        _compile(segment._run_sum_kernel,
                 {"X": F32, "ORDER": I64, "KEYS": keys, "START": I64, "SUMS": F32, "PIECES": F32, "N": I32, "K": I32,
                  "D": I32, "sxn": I32, "sxd": I32, "BLOCK_C": C, "BLOCK_D": C}, {"BLOCK_C": 64, "BLOCK_D": 64})
    _compile(segment._join_pieces_kernel,
             {"START": I64, "PIECES": F32, "SUMS": F32, "COUNTS": F32, "K": I32, "D": I32, "BLOCK_C": C, "BLOCK_D": C},
             {"BLOCK_C": 64, "BLOCK_D": 64})
