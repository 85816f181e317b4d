"""Is the segmentation-guided run's melanoma gain the architecture or HAM10000's age / sex / site (which the ISIC
2018 test CSV does not have)? Melanoma AUROC on the same out-of-fold lesions, posteriors (calibrated, training
prior), for: the recommended recipe's fold model (image only), the seg-guided fold model with the metadata it
was validated with, and the same seg-guided model with age, sex and site blanked (predicted through
`dermfusion predict --clinical` on a copy of the fold's manifest without them). Paired bootstrap over lesions.

    python benchmarks/seg_guided_without_metadata.py --manifest ham_train.parquet \
        --baseline runs/ham_rec/oof_calibrated.csv --with-metadata runs/ham_seg/oof_calibrated.csv \
        --without-metadata seg_fold0_nometa_clinical.csv
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from dermfusion.data.manifest import load_manifest, targets
from dermfusion.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--with-metadata", required=True)
    ap.add_argument("--without-metadata", required=True)
    ap.add_argument("--n-boot", type=int, default=2000)
    a = ap.parse_args()
    task = get_task("isic2018")
    C = list(task.classes)
    # each file's first column names the lesion (`lesion_id` in a run's files; predict's `image` column holds the
    # manifest's lesion ids)
    frames = {name: pd.read_csv(path, index_col=0, dtype={0: str})
              for name, path in (("baseline", a.baseline), ("with metadata", a.with_metadata),
                                 ("without metadata", a.without_metadata))}
    man = load_manifest(a.manifest).set_index("lesion_id")
    ids = [i for i in man.index if all(i in f.index for f in frames.values())]
    y = targets(man.loc[ids], task).argmax(1)
    mel = (y == C.index("MEL")).astype(int)
    s = {k: f.loc[ids, "MEL"].to_numpy() for k, f in frames.items()}
    rng = np.random.default_rng(0)
    boots = {k: [] for k in s}
    for _ in range(a.n_boot):
        i = rng.integers(0, len(ids), len(ids))
        if mel[i].min() == mel[i].max():
            continue
        for k in s:
            boots[k].append(roc_auc_score(mel[i], s[k][i]))
    print(f"{len(ids)} lesions, {mel.sum()} melanomas; melanoma AUROC of the posterior [95 % CI]; "
          "difference from the baseline [paired 95 % CI]")
    base = np.array(boots["baseline"])
    for k in s:
        b = np.array(boots[k])
        d = b - base
        print(f"| {k} | {roc_auc_score(mel, s[k]):.3f} [{np.quantile(b, .025):.3f}, {np.quantile(b, .975):.3f}] | "
              f"{roc_auc_score(mel, s[k]) - roc_auc_score(mel, s['baseline']):+.3f} "
              f"[{np.quantile(d, .025):+.3f}, {np.quantile(d, .975):+.3f}] |")


if __name__ == "__main__":
    main()
