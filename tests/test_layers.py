"""Layering: lower layers never import the layers above them (imports parsed with ``ast``).

Layers, bottom to top: ``gkl.losses`` / ``gkl.attacks`` / ``gkl.models`` / ``gkl.data`` /
``gkl.rl`` -> ``gkl.tasks`` -> ``gkl.evaluate`` and ``gkl.train`` -> the entry points ``train.py``
and ``eval.py``. Every import counts, including deferred ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("train", "eval")  # train.py, eval.py at the repository root
LOWER = ("gkl.losses", "gkl.attacks", "gkl.models", "gkl.data", "gkl.rl")

# (importing packages, forbidden targets, why)
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (LOWER, ("gkl.tasks", "gkl.evaluate", "gkl.train", *ENTRY_POINTS), "lower layer"),
    (("gkl.tasks",), ("gkl.evaluate", "gkl.train", *ENTRY_POINTS), "tasks"),
    (("gkl.evaluate",), ("gkl.train", *ENTRY_POINTS), "evaluation"),
    (("gkl",), ENTRY_POINTS, "library"),  # nothing imports the entry points
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(source: str, module: str, is_package: bool):
    """``(node, names)`` for every import in ``source``: the absolute names it may load;
    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule), relative imports
    are resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield node, {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node, {target} | {f"{target}.{alias.name}" for alias in node.names}


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    return {n for _, names in import_statements(source, module, is_package) for n in names}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations() -> list[str]:
    """One line per offending import statement: ``path:line: statement (rule)``."""
    found = []
    for path in sorted((ROOT / "gkl").rglob("*.py")):
        module = module_name(path)
        statements = import_statements(path.read_text(), module, path.name == "__init__.py")
        for node, names in statements:
            for importers, targets, layer in RULES:
                if not any(within(module, p) for p in importers):
                    continue
                bad = sorted({t for t in targets for n in names if within(n, t)})
                if bad:
                    found.append(
                        f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)} "
                        f"({layer} must not import {', '.join(bad)})"
                    )
    return sorted(set(found))


def test_import_parser_resolves_relative_and_from_imports():
    source = (
        "import gkl.train\n"
        "from gkl import evaluate\n"
        "from ..tasks.distill import DistillTask\n"
        "from . import pgd\n"
        "def deferred():\n"
        "    import eval\n"
    )
    names = imported_modules(source, "gkl.attacks.pgd", is_package=False)
    assert {"gkl.train", "gkl.evaluate", "gkl.tasks.distill", "gkl.attacks.pgd", "eval"} <= names
    assert "gkl.tasks.distill.DistillTask" in names  # harmless: no module has that name
    assert imported_modules("from .x import y", "gkl.data", is_package=True) >= {"gkl.data.x"}


def test_lower_layers_never_import_the_layers_above():
    found = violations()
    assert not found, "layering violations:\n" + "\n".join(found)
