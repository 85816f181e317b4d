"""A small synthetic MILK10k-like manifest for the tabular tests (shared by tests/tabular and tests/card; a module of
its own so that importing it does not depend on which test directories pytest collected)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from dermfusion.tasks import MILK10K

CONCEPTS = ("ulceration_crust", "hair", "vasculature_vessels", "erythema", "pigmented")
FAST = {"n_estimators": 60, "learning_rate": 0.1, "num_leaves": 7, "min_child_samples": 5}


def synthetic_manifest(n=330, seed=0, n_classes=4, folds=3):
    """Classes 0..n_classes-1 of MILK10k; class c raises concept c on both views (learnable)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    df = pd.DataFrame({"lesion_id": [f"IL_{i:05d}" for i in range(n)], "dataset": "synthetic",
                       "fold": np.arange(n) % folds})
    for m in ("clinical", "dermoscopic"):
        for j, c in enumerate(CONCEPTS):
            v = rng.uniform(0, 0.5, n) + 0.45 * (y == j)
            v[rng.random(n) < 0.05] = np.nan
            df[f"concept_{m}_{c}"] = v
    df["age"] = np.where(rng.random(n) < 0.05, np.nan, rng.integers(20, 90, n))
    df["sex"] = rng.choice(["male", "female", ""], n)
    df["skin_tone"] = rng.choice(["1", "2", "3", ""], n)
    df["site"] = rng.choice(["trunk", "head_neck_face", "hand", ""], n)
    for k, cls in enumerate(MILK10K.classes):
        df[f"label_{cls}"] = (y == k).astype(float)
    return df, y
