"""Reading CLI output in tests without depending on how it was wrapped, and finding the tests that read it.

rich wraps what the CLI prints at the console's width, so prose in `result.output` may hold a line break anywhere a
space was: compare it with `squash(...)`, or better check the files and structured results the command wrote.
tests/conftest.py pins a wide plain console for every test and marks `cli` the tests that run the CLI and read what
it printed (`reads_cli_output`: run them alone with `-m cli`); `.ci/run` runs the whole suite with COLUMNS=60 under a
long temporary path.
"""
from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
import textwrap
from pathlib import Path

# running the CLI: typer's runner (in process) or `python -m dermfusion.cli` / torchrun (a subprocess)
CLI_CALL = re.compile(r"CliRunner|\.invoke\(|torchrun\(|[\"']dermfusion\.cli[\"']")
OUTPUT_FIELDS = {"output", "stdout", "stderr"}


def squash(text: str) -> str:
    """`text` with every run of whitespace (line breaks from wrapping included) collapsed to one space, stripped:
    compare message prose with this, never with the raw console output."""
    return re.sub(r"\s+", " ", text).strip()


Helpers = tuple  # (names that run the CLI, names that read its output, names that hand its output back)


def _ids_under(tree: ast.AST, kind: type, field: str) -> set[int]:
    """The nodes below `field` of every `kind` node (an assertion's message, a return's value)."""
    return {id(n) for s in ast.walk(tree) if isinstance(s, kind) and getattr(s, field) is not None
            for n in ast.walk(getattr(s, field))}


def _scan(obj, helpers: Helpers) -> tuple[bool, bool, bool]:
    """(runs the CLI, reads what it printed, hands that back) for a function or class. Runs: a CLI call, or a call
    to a helper of its module that makes one. Reads: `.output` / `.stdout` / `.stderr` other than in an assertion's
    message or a `return`, a call to a helper that reads, or the value of a call to a helper that hands it back."""
    runners, readers, givers = helpers
    try:
        src = textwrap.dedent(inspect.getsource(obj))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError):
        return False, False, False
    in_msg, in_return = _ids_under(tree, ast.Assert, "msg"), _ids_under(tree, ast.Return, "value")
    discarded = {id(s.value) for s in ast.walk(tree) if isinstance(s, ast.Expr)}
    runs, reads, gives = bool(CLI_CALL.search(src)), False, False
    for n in ast.walk(tree):
        if id(n) in in_msg:
            continue
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
            name = n.func.id
            runs |= name in runners
            reads |= name in readers or (name in givers and id(n) not in discarded and id(n) not in in_return)
            gives |= name in givers and id(n) in in_return
        elif isinstance(n, ast.Attribute) and n.attr in OUTPUT_FIELDS:
            gives |= id(n) in in_return
            reads |= id(n) not in in_return
    return runs, reads, gives


@functools.lru_cache(maxsize=None)
def _helpers(module_name: str) -> Helpers | None:
    """The module's own functions and classes that run the CLI, that read its output, that hand it back (through one
    another too); None when the module's text never mentions running the CLI (then nothing more is read)."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None) or ""
    if not file.endswith(".py") or not CLI_CALL.search(Path(file).read_text(encoding="utf-8")):
        return None
    own = [(n, o) for n, o in vars(module).items()
           if (inspect.isfunction(o) or inspect.isclass(o)) and getattr(o, "__module__", None) == module_name]
    helpers: Helpers = (frozenset(), frozenset(), frozenset())
    while True:
        scanned = [(n, _scan(o, helpers)) for n, o in own]
        found = tuple(frozenset(n for n, flags in scanned if flags[i]) for i in range(3))
        if found == helpers:
            return helpers
        helpers = found


@functools.lru_cache(maxsize=None)
def reads_cli_output(fn) -> bool:
    """Whether the test or fixture function `fn` runs the CLI and reads what it printed."""
    helpers = _helpers(getattr(fn, "__module__", None) or "")
    if helpers is None:
        return False
    runs, reads, _ = _scan(fn, helpers)
    return runs and reads
