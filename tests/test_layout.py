"""The layers import one way (README, Layout): the library never imports ``train`` or
``eval`` (the CLI, which dispatches to them, excepted), ``train`` and ``eval`` never import
each other, and ``kernels`` needs nothing of the library. Checked on the source with
``ast``, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {
    "library": (REPO / "tokenizers_vq", ("tokenizers_vq.train", "tokenizers_vq.eval")),
    "kernels": (REPO / "kernels", ("tokenizers_vq.",)),
    "train": (REPO / "train", ("tokenizers_vq.eval",)),
    "eval": (REPO / "eval", ("tokenizers_vq.train",)),
}
# the command line dispatches to every layer; the device scripts stage data and run trainings
EXEMPT = {REPO / "tokenizers_vq" / "cli.py", *(REPO / "eval" / "gpu").glob("*.py")}


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def sources(root: Path) -> list[Path]:
    # the library folder may hold links to kernels/, train/ and eval/ (a device call's set-up)
    return [p for p in sorted(root.rglob("*.py"))
            if not any(part.is_symlink() for part in [p, *p.parents] if root in part.parents or part == root)]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_go_one_way(layer):
    root, forbidden = LAYERS[layer]
    allowed = ("tokenizers_vq.kernels",) if layer == "kernels" else ()
    bad = []
    for path in sources(root):
        if path in EXEMPT:
            continue
        for name in imported_modules(path):
            if name.startswith(forbidden) and not name.startswith(allowed):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tokenizers_vq.train.data import x  # noqa\n    import tokenizers_vq.eval.metrics\n")
    assert {"tokenizers_vq.train.data", "tokenizers_vq.eval.metrics"} <= set(imported_modules(f))
