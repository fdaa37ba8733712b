"""The package's layers import only downward: a cycle or an upward import fails here.

Every ``import`` and ``from ... import`` of every module is read from its source (lazy imports
inside functions included) and each toreq module it names must sit in the same layer or a lower
one. The layers, lowest first:

0. foundations: ``toreq.errors``, ``toreq.validation``, ``toreq.data``, ``toreq.utils``,
   ``toreq.checkpoint`` (files only: it imports no model)
1. operators: ``toreq.ops`` (the C++ ops, their references, the one Python fixed-point loop)
2. solvers: ``toreq.solvers``
3. dynamics: ``toreq.dynamics``
4. estimators: ``toreq.estimators``
5. networks: ``toreq.nn``
6. training and tools: ``toreq.train``, ``toreq.lm_training``, ``toreq.distributed``,
   ``toreq.diagnostics``, ``toreq.export``
7. experiments and the command line: everything else (presets, validate, lm_study, cli, ...)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "toreq"

LAYERS = [
    ("toreq.errors", "toreq.validation", "toreq.data", "toreq.utils",
     "toreq.checkpoint"),
    ("toreq.ops",),
    ("toreq.solvers",),
    ("toreq.dynamics",),
    ("toreq.estimators",),
    ("toreq.nn",),
    ("toreq.train", "toreq.lm_training", "toreq.distributed", "toreq.diagnostics",
     "toreq.export"),
]
TOP = len(LAYERS)  # experiments and the command line
# Deprecated aliases that import their new, higher home lazily, for one release (remove each with
# its alias): (module, the module it may import).
def layer_of(module: str) -> int:
    if module == "toreq":
        return 0  # every module already runs the package's __init__: importing it adds nothing
    if module == "toreq._C":
        return 1  # the extension: the ops' kernels
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return TOP


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def toreq_imports(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` of every toreq module that the module ``name`` imports, anywhere."""
    found = []
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "toreq"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "toreq":
                continue
            # `from toreq import ops` imports the submodule toreq.ops
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                              or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_only_go_downward(path):
    name = module_name(path)
    # the package's __init__ re-exports (loads the extension and the ops): above every layer
    own = TOP if name == "toreq" else layer_of(name)
    imports = toreq_imports(path.read_text(), name, path.name == "__init__.py")
    upward = [(line, target, layer_of(target)) for line, target in imports
              if layer_of(target) > own]
    assert not upward, (
        f"{name} (layer {own}) imports from higher layers: "
        + "; ".join(f"line {line}: {target} (layer {level})" for line, target, level in upward))


def test_the_layer_map_knows_the_core():
    # a renamed core module would silently fall into the top layer: fail instead
    for module in ("toreq.ops", "toreq.solvers", "toreq.dynamics", "toreq.estimators", "toreq.nn",
                   "toreq.train", "toreq.errors", "toreq.validation"):
        path = PACKAGE.parent / module.replace(".", "/")
        assert path.with_suffix(".py").exists() or path.is_dir(), module


def test_an_upward_import_is_caught():
    lazy = "def f():\n    from toreq.train import fit\n    return fit\n"
    assert [t for _, t in toreq_imports(lazy, "toreq.ops.probe")] == ["toreq.train"]
    relative = "from ..nn import LoopedMLP\n"
    assert [t for _, t in toreq_imports(relative, "toreq.ops.probe")] == ["toreq.nn"]
    assert layer_of("toreq.train") > layer_of("toreq.ops.probe")
