"""``dermfusion demo``: the whole pipeline on the bundled HAM10000 sample."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def demo_cmd(
    out: Path = typer.Option(Path("dermfusion_demo"), help="where to write the demo's outputs"),
    epochs: Optional[int] = typer.Option(None, help="training epochs per fold (default: the demo config's, 20)"),
):
    """Run the whole pipeline on the bundled sample: import → check → fine-tune the ImageNet EfficientNet-Lite0
    (2 folds) → predict → evaluate, printing the out-of-fold balanced accuracy beside chance."""
    from ..demo import run_demo

    run_demo(out, epochs=epochs)
