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


def _glibc_with_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return False
    return hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33+ (mallopt, mallinfo2)")
def test_large_blocks_come_from_the_heap_after_the_call():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "TVQ_KEEP"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "0"]


def test_your_own_malloc_settings_win():
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    code = "from tokenizers_vq.runtime import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    env = {**os.environ, "TVQ_KEEP_FREED_MEMORY": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
