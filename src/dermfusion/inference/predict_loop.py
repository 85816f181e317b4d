"""The batched prediction loop shared by training-time validation and bundle predictors."""
from __future__ import annotations

import numpy as np
import torch

from ..data.samplers import shard_bounds
from ..data.transforms import tta_views
from ..runtime.device import autocast, move_batch
from ..runtime.distributed import current, DistributedError, run_collectively


def predict_probs(model, loader, device, amp=None, channels_last=False, tta: int = 0, modalities=(),
                  progress=None) -> np.ndarray:
    """Softmax probabilities, N×C, averaged over `tta` label-preserving views (0/1 = no TTA)."""
    return predict_heads(model, loader, device, amp, channels_last, tta, modalities, progress)["logits"]


def _logits(out: dict) -> dict:
    return {"logits": out["logits"]}


@torch.no_grad()
def predict_heads(model, loader, device, amp=None, channels_last=False, tta: int = 0, modalities=(),
                  progress=None, heads=_logits) -> dict[str, np.ndarray]:
    """Softmax probabilities of each head ``heads(outputs)`` names ({name: B×K logits}), N×K each, averaged
    over `tta` label-preserving views (0/1 = no TTA)."""
    model.eval()
    out: dict[str, list] = {}
    n_views = max(1, tta)
    views = {m: tta_views(m, n_views) for m in modalities}
    it = progress(loader, "predicting") if progress else loader
    for batch in it:
        batch = move_batch(batch, device, channels_last)
        acc: dict = {}
        for v in range(n_views):
            b = dict(batch)
            if n_views > 1:
                b["images"] = {m: views[m][v](x) for m, x in batch["images"].items()}
            with autocast(device, amp):
                logits = heads(model(b))
            for name, z in logits.items():
                p = torch.softmax(z.float(), dim=-1)
                acc[name] = p if name not in acc else acc[name] + p
        for name, p in acc.items():
            out.setdefault(name, []).append((p / n_views).cpu().numpy())
    if not out:
        return {"logits": np.zeros((0, 0), np.float32)}
    return {name: np.concatenate(parts) for name, parts in out.items()}


def predict_frame_sharded(predict, df, dist=None, what: str = "prediction") -> np.ndarray:
    """``predict(frame) -> N×C`` over a whole manifest, split across torchrun ranks.

    Rank r predicts the r-th contiguous, non-padded shard of the rows; the shards are gathered in rank order,
    so every rank gets the full N×C array in the manifest's row order. A failure on any rank raises
    ``DistributedError`` on every rank (naming the rank and its error) instead of leaving the others waiting.
    Outside torchrun this is just ``predict(df)``.
    """
    ctx = dist if dist is not None else current()
    if not ctx.distributed:
        return predict(df)
    start, stop = shard_bounds(len(df), ctx.rank, ctx.world_size)
    part = df.iloc[start:stop].reset_index(drop=True)

    def work():
        return np.asarray(predict(part)) if len(part) else None

    parts = [p for p in run_collectively(ctx, work, what=what) if p is not None]
    out = np.concatenate(parts) if parts else np.zeros((0, 0), np.float64)
    if len(out) != len(df):
        raise DistributedError(f"{what}: gathered {len(out)} rows for a manifest of {len(df)}")
    return out
