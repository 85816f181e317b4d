"""The ``dermfusion`` command line: one module per verb group, registered explicitly in ``cli.app``."""
from .app import app, main

__all__ = ["app", "main"]
