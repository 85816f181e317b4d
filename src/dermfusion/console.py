"""One rich console and progress helper for the whole CLI."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False)
err_console = Console(stderr=True)


def progress_enabled() -> bool:
    return os.environ.get("DERMFUSION_PROGRESS", "1") != "0"


def make_progress(transient: bool = True) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=transient, disable=not progress_enabled() or not sys.stderr)


def track(items, description: str, total: int | None = None):
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    with make_progress() as p:
        task = p.add_task(description, total=total, info="")
        for it in items:
            yield it
            p.advance(task)
