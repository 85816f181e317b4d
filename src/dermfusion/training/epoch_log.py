"""What a fold prints and logs per epoch: the console line, TensorBoard scalars (when installed), and the silent
progress display of ranks other than 0."""
from __future__ import annotations

from pathlib import Path


class NullProgress:
    """Stands in for the progress display on ranks other than 0."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def remove_task(self, *a, **k):
        pass


def epoch_line(rec: dict) -> str:
    parts = [f"fold {rec['fold']} epoch {rec['epoch']}", f"loss {rec['loss']:.4f}"]
    for k in ("val_official", "val_balanced_accuracy", "val_macro_f1"):
        if k in rec:
            parts.append(f"{k.removeprefix('val_')} {rec[k]:.4f}")
    parts.append(f"{rec['lesions_per_s']:.1f} lesions/s, data wait {rec['data_wait_frac']:.0%}")
    return " · ".join(parts)


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    try:
        return SummaryWriter(str(out / "tb"))
    except Exception:
        return None
