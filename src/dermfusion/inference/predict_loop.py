"""The batched prediction loop shared by training-time validation and bundle predictors."""
from __future__ import annotations

import numpy as np
import torch

from ..data.transforms import tta_views
from ..training.runtime import autocast, move_batch


@torch.no_grad()
def predict_probs(model, loader, device, amp=None, channels_last=False, tta: int = 0, modalities=(),
                  progress=None) -> np.ndarray:
    """Softmax probabilities, N×C, averaged over `tta` label-preserving views (0/1 = no TTA)."""
    model.eval()
    out = []
    n_views = max(1, tta)
    views = {m: tta_views(m, n_views) for m in modalities}
    it = progress(loader, "predicting") if progress else loader
    for batch in it:
        batch = move_batch(batch, device, channels_last)
        acc = None
        for v in range(n_views):
            b = dict(batch)
            if n_views > 1:
                b["images"] = {m: views[m][v](x) for m, x in batch["images"].items()}
            with autocast(device, amp):
                logits = model(b)["logits"].float()
            p = torch.softmax(logits, dim=-1)
            acc = p if acc is None else acc + p
        out.append((acc / n_views).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
