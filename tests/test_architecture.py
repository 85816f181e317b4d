"""The package's import order (docs/ARCHITECTURE.md), checked on the source with ``ast``.

Every module of src/dermfusion belongs to one unit below (longest matching prefix), and every unit to a level. A
module may import its own unit and units of *lower* levels only: no upward import, no import between two units of
the same level, and no import cycle between modules at all. Imports inside functions are for optional or heavy
dependencies (and, in the CLI, for start-up speed): outside ``dermfusion.cli`` each in-function import of a
dermfusion module carries a comment on its line saying why it is not at the top.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dermfusion"

# low → high; a unit may import only from units of lower levels (and from itself)
LEVELS: list[tuple[str, list[str]]] = [
    ("ground", ["dermfusion", "dermfusion.errors"]),
    ("vocabulary", ["dermfusion.tasks", "dermfusion.criteria", "dermfusion.console"]),
    ("foundations", ["dermfusion.config", "dermfusion.data", "dermfusion.runtime"]),
    ("models and measures", ["dermfusion.models", "dermfusion.evaluation", "dermfusion.explain"]),
    ("bundles, concept scores", ["dermfusion.bundle", "dermfusion.concepts"]),
    ("model cards", ["dermfusion.card"]),
    ("tabular experts, export", ["dermfusion.tabular", "dermfusion.export"]),
    ("inference", ["dermfusion.inference"]),
    ("clinical engine", ["dermfusion.clinical"]),
    ("training", ["dermfusion.training"]),
    ("applications", ["dermfusion.service", "dermfusion.bench", "dermfusion.demo"]),
    ("command line", ["dermfusion.cli"]),
]
LAZY_ALLOWED = ("dermfusion.cli",)  # the CLI imports a verb's stages when the verb runs (start-up speed)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
UNIT_LEVEL = {unit: i for i, (_, units) in enumerate(LEVELS) for unit in units}


def unit_of(module: str) -> str | None:
    best = None
    for unit in UNIT_LEVEL:
        if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best)):
            best = unit
    return best


def imported_modules(module: str, node: ast.AST) -> list[str]:
    """The dermfusion modules an import statement loads (`from pkg import sub` counts as importing pkg.sub)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "dermfusion"]
    if node.level:
        base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "dermfusion":
        return []
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return subs or [target]


def collect():
    """[(module, imported module, line, in a function, the source line)] for every dermfusion import."""
    out = []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(module, node):
                    out.append((module, target, node.lineno, id(node) in in_function, lines[node.lineno - 1]))
    return out


IMPORTS = collect()


def test_every_module_has_a_level():
    assert not [m for m in MODULES if unit_of(m) is None], "add the unit to LEVELS (and to docs/ARCHITECTURE.md)"
    assert len(UNIT_LEVEL) == sum(len(units) for _, units in LEVELS), "a unit is listed twice"


def test_no_upward_or_sideways_imports():
    bad = []
    for src, dst, line, _, _ in IMPORTS:
        a, b = unit_of(src), unit_of(dst)
        if b is None or a == b:
            continue
        if UNIT_LEVEL[b] >= UNIT_LEVEL[a]:
            bad.append(f"{src}:{line} imports {dst} ({LEVELS[UNIT_LEVEL[a]][0]} → {LEVELS[UNIT_LEVEL[b]][0]})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = defaultdict(set)
    for src, dst, _, _, _ in IMPORTS:
        # a package's __init__ importing its own submodules is how packages work, not a cycle between jobs
        if dst != src and dst in MODULES and not src.startswith(dst + "."):
            graph[src].add(dst)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_in_function_imports_say_why():
    bad = [f"{src}:{line}: {text.strip()}" for src, dst, line, lazy, text in IMPORTS
           if lazy and not src.startswith(LAZY_ALLOWED) and "#" not in text]
    assert not bad, ("in-function imports of dermfusion modules need a comment saying why they are not at the top "
                     "(an optional or heavy dependency), or belong at the top:\n" + "\n".join(bad))


@pytest.mark.parametrize("limit", [360])
def test_no_module_is_huge(limit):
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit}
    assert not big, f"split these by job (~350 lines at most): {big}"
