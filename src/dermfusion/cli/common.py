"""What every verb shares: one-line errors, the user-error guard around each command, manifest loading.

The verb modules import only the standard library, typer and the console at module level; each command imports
the stages it runs when it runs, so ``import dermfusion.cli`` (and ``dermfusion --help``) stays fast.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, NoReturn

import typer
from rich.markup import escape

from ..console import err_console
from ..errors import DermfusionError, error_message

# optional dependencies → the extra that installs them (a missing one is a one-line error, not a traceback)
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "sqlalchemy": "serve", "prometheus_client": "serve",
          "multipart": "serve", "python_multipart": "serve", "onnx": "export", "onnxruntime": "export",
          "onnxscript": "export", "xgboost": "xgboost", "psycopg2": "postgres", "mlflow": "tracking"}


def fail(msg: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """Run a command so that a ``DermfusionError`` prints one line and exits with code 2 — as do a missing input
    file, a key the input lacks (``KeyError``: e.g. lesion ids absent from a manifest, kept from the earlier CLI)
    and a missing optional dependency; any other exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DermfusionError, FileNotFoundError, KeyError) as e:
            fail(error_message(e))
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in EXTRAS:
                raise
            fail(f"this command needs {top}, which is not installed: pip install 'dermfusion[{EXTRAS[top]}]'")

    return run


def manifest(path: Path):
    from ..data.manifest import load_manifest  # the data stage pulls in pandas/torch: load it when a verb runs

    return load_manifest(path)
