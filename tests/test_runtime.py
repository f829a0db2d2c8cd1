"""Process settings for CPU encoding: freed activations stay in the heap (glibc)."""

from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys

import pytest

# In a fresh process: a 64 MiB block is mmapped before the call and served from the heap after
# it (glibc's mallinfo2: hblkhd counts the bytes in mmapped blocks).
PROBE = """
import ctypes, ctypes.util, torch
from tokenizers_vq.runtime import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
def mapped():
    return libc.mallinfo2().hblkhd
base = mapped()
a = torch.empty(64 << 20, dtype=torch.uint8)
before = mapped() - base
del a
applied = keep_freed_memory()
base = mapped()
b = torch.empty(64 << 20, dtype=torch.uint8)
after = mapped() - base
print(applied, keep_freed_memory(), before >= 64 << 20, after)
"""


def _glibc_version() -> tuple[int, ...]:
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name or not hasattr(ctypes.CDLL(name), "mallopt"):
        return ()
    try:
        return tuple(int(p) for p in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split("."))
    except (ValueError, OSError, IndexError):
        return ()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("MALLOC_", "TVQ_KEEP")) and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}


@pytest.mark.skipif(_glibc_version() < (2, 35), reason="needs glibc 2.35+ (heap blocks over 32 MiB, mallinfo2)")
def test_large_blocks_come_from_the_heap_after_the_call():
    env = _clean_env()
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "0"]


@pytest.mark.skipif(not _glibc_version(), reason="needs glibc (mallopt)")
@pytest.mark.parametrize("setting", [{}, {"MALLOC_TRIM_THRESHOLD_": "131072"}, {"TVQ_KEEP_FREED_MEMORY": "off"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_your_own_malloc_settings_win(setting):
    code = "from tokenizers_vq.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], env={**_clean_env(), **setting}, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(not setting)


def test_sizes_mallopt_cannot_take_are_refused():
    from tokenizers_vq.runtime import keep_freed_memory  # noqa: PLC0415

    with pytest.raises(ValueError, match="trim_bytes"):
        keep_freed_memory(trim_bytes=4 << 30)
