"""The package's layering (docs/architecture.md), checked on the import graph of the source.

Every import points down the layers; no command line imports another; ``cn_lightning`` never
imports ``data_prep``; no module shadows the standard library; the module graph has no cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module's layer is the first prefix that matches its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "cn_lightning",
            "cn_lightning.errors",
            "cn_lightning.log",
            "cn_lightning.atomic",
            "cn_lightning.serialization",
            "cn_lightning.loggers",
            "cn_lightning.cli",
            "cn_lightning.batching",
        ),
    ),
    ("conditions", ("cn_lightning.conditions",)),
    ("data and metrics", ("cn_lightning.data", "cn_lightning.metrics")),
    ("models", ("cn_lightning.models",)),
    (
        "I/O and inference",
        (
            "cn_lightning.inference",
            "cn_lightning.evaluation",
            "cn_lightning.config",
            "cn_lightning.strategies",
        ),
    ),
    ("callbacks", ("cn_lightning.callbacks",)),
    (
        "command lines",
        (
            "cn_lightning.train",
            "cn_lightning.export",
            "cn_lightning.generate",
            "cn_lightning.evaluate",
            "cn_lightning.pretrain_toy",
        ),
    ),
    ("data_prep", ("data_prep",)),
]
CLIS = set(LAYERS[-2][1])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_root = prefix == "cn_lightning" and module != "cn_lightning"
            if exact_root:
                continue
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, (
        f"{module} has no layer in tests/test_architecture.py (and docs/architecture.md)"
    )
    return best


def imports_of(path: Path, module: str) -> set[str]:
    """Every ``cn_lightning``/``data_prep`` module ``path`` imports (also inside functions);
    ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("cn_lightning", "data_prep") and name in MODULES:
                found.add(name)
    return found


FILES = {
    module_name(p): p for pkg in ("cn_lightning", "data_prep") for p in (ROOT / pkg).rglob("*.py")
}
MODULES = set(FILES)
GRAPH = {m: imports_of(p, m) - {m} for m, p in FILES.items()}


def test_every_import_points_down_the_layers():
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in GRAPH.items()
        for d in deps
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_no_command_line_imports_another():
    stacked = [f"{m} imports {d}" for m in CLIS for d in GRAPH.get(m, ()) if d in CLIS]
    assert not stacked, stacked


def test_package_never_imports_data_prep_and_has_no_utils():
    assert not [
        (m, d)
        for m, deps in GRAPH.items()
        if m.startswith("cn_lightning")
        for d in deps
        if d.startswith("data_prep")
    ]
    assert not (ROOT / "cn_lightning" / "utils").exists()


def test_no_module_shadows_the_standard_library():
    shadowing = [m for m in MODULES if m.rpartition(".")[2] in sys.stdlib_module_names and "." in m]
    assert not shadowing, shadowing


def test_module_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in GRAPH[m]:
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_layer_table_is_the_documented_one():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name, prefixes in LAYERS:
        assert name in doc, f"layer {name!r} is missing from docs/architecture.md"
        for prefix in prefixes:
            short = prefix.replace("cn_lightning.", "").replace(".", "/")
            assert short in doc, f"{prefix} ({name}) is missing from docs/architecture.md"
