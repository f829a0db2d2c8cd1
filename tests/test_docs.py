"""Every docstring example in the library runs and prints what it says: one test per
module that has examples (found by scanning the source, so a new module's examples are
picked up without a new test)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
import torch

import tokenizers_vq
import tokenizers_vq.quantizers

PACKAGE = Path(tokenizers_vq.__file__).resolve().parent


def modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(p.is_symlink() for p in path.relative_to(PACKAGE).parents if p != Path(".")) or \
                (PACKAGE / path.relative_to(PACKAGE).parts[0]).is_symlink():
            continue  # kernels/, train/, eval/ linked in by a device call's set-up
        if ">>>" in path.read_text():
            rel = path.relative_to(PACKAGE.parent).with_suffix("")
            names.append(".".join(rel.parts))
    return names


MODULES = modules_with_examples()


def test_the_scan_finds_the_known_examples():
    assert {"tokenizers_vq.tokenizer", "tokenizers_vq.quantizers.vq", "tokenizers_vq.backbones.image"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    globs = {"torch": torch, **{n: getattr(tokenizers_vq, n) for n in tokenizers_vq.__all__},
             **{n: getattr(tokenizers_vq.quantizers, n) for n in tokenizers_vq.quantizers.__all__}}
    torch.manual_seed(0)
    result = doctest.testmod(module, extraglobs=globs, verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
