"""The one base of the errors dermfusion raises on purpose: ``DermfusionError``.

A ``DermfusionError`` means "an input, a file or a setting is wrong, and the message says what to do": the CLI
prints its message as one line (exit code 2) instead of a traceback. Any other exception is a bug and keeps its
traceback.

Each stage defines its subclasses beside the code that raises them (``ConfigError`` in ``config``,
``ManifestError`` in ``data.manifest``, ``BundleError`` in ``bundle`` …). Each subclass also derives from the
built-in class callers caught before this base existed (``ValueError``, ``RuntimeError``, ``FileNotFoundError``,
``KeyError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class DermfusionError(Exception):
    """Base of every error dermfusion raises for bad input, files or settings (never for a bug)."""


class TaskError(DermfusionError, KeyError):
    """An unknown task or class name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def error_message(e: BaseException) -> str:
    """The text to show a user for ``e``: its message, without KeyError's quotes."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
