"""Which lesions a run's models trained on (``RUN/training_lesions.txt``, one id a line): what a labelled local
sample for ``dermfusion operating-point --local`` must not contain — on those lesions the posteriors are in-sample,
surer than on new ones, and cut-offs chosen on them come out too lax."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..card.sources import read_json
from ..data.manifest import train_only_mask

TRAINING_LESIONS = "training_lesions.txt"


def write_training_lesions(out: Path, df: pd.DataFrame, task, fold_ids: list[int]) -> None:
    """The ids of the labelled lesions at least one of the run's models trains on (one a line,
    RUN/training_lesions.txt): what a local sample for `operating-point --local` must not contain (on them the
    posteriors are in-sample). Fold model f trains on the labelled rows of the other folds and the train-only rows,
    so only a run of a single fold leaves main-dataset lesions out (that fold's); folds a resumed run trained before
    count too (more folds: more lesions trained on)."""
    cols = [c for c in task.label_columns() if c in df.columns]
    labelled = df[cols].notna().all(axis=1) if cols else pd.Series(False, index=df.index)
    if "fold" in df:
        labelled &= (df["fold"] >= 0) | train_only_mask(df)
    done = {int(d.name.split("_")[-1]) for d in out.glob("**/fold_*") if d.is_dir() and d.name[5:].isdigit()}
    trained = set(fold_ids) | done
    if len(trained) == 1 and min(trained) >= 0 and "fold" in df:
        labelled &= (df["fold"] != min(trained)) | train_only_mask(df)
    ids = set(df.loc[labelled, "lesion_id"].astype(str))
    if (out / TRAINING_LESIONS).is_file():
        ids |= set((out / TRAINING_LESIONS).read_text().splitlines())
    (out / TRAINING_LESIONS).write_text("".join(f"{i}\n" for i in sorted(ids)))


def combine_training_lesions(out: Path, runs: list[Path]) -> None:
    """A blend's (ensemble / stack) record: the union of its member runs' — written only when every member keeps one
    (else the blend has none, and `operating-point --local` says what it cannot check)."""
    records = [Path(r) / TRAINING_LESIONS for r in runs]
    if records and all(f.is_file() for f in records):
        ids = set().union(*(set(f.read_text().splitlines()) for f in records))
        (Path(out) / TRAINING_LESIONS).write_text("".join(f"{i}\n" for i in sorted(ids)))


def read_training_lesions(run: Path) -> set[str] | None:
    """The lesions a run's models trained on: its record (training_lesions.txt), else — an older or ensembled run of
    two or more folds — its out-of-fold lesions (each trained the other folds' models; train-only rows are missing
    from that list); None when neither tells (a single fold's out-of-fold lesions are the ones it did not train on)."""
    if (run / TRAINING_LESIONS).is_file():
        return set((run / TRAINING_LESIONS).read_text().splitlines())
    if (run / "oof.csv").is_file():
        oof = pd.read_csv(run / "oof.csv", usecols=["lesion_id", "fold"], dtype={"lesion_id": str})
        if oof["fold"].nunique() >= 2:
            return set(oof["lesion_id"])
    return None


def check_local_sample(run: Path, first_bundle: Path, ids, datasets=()) -> tuple[list[str], str | None]:
    """(the sample's lesions the run trained on, a caveat when the run's record is incomplete): what
    `operating-point --local` refuses, and — for an older run that keeps only its out-of-fold ids, or none — what it
    cannot check, with the training datasets its model card names beside the sample's."""
    seen = read_training_lesions(run)
    shared = sorted(set(map(str, ids)) & seen) if seen is not None else []
    if (run / TRAINING_LESIONS).is_file():
        return shared, None
    known = "no record of its training lesions" if seen is None else \
        f"the ids of its {len(seen)} out-of-fold lesions only (the lesions of folds left out of its cross-validation " \
        "and train-only rows, such as a dataset added with `data combine`, are not listed)"
    card = (read_json(first_bundle / "model_card.json") or {}).get("training_data") or {}
    data = f". It trained on {', '.join(card['datasets'])} ({card.get('n_lesions')} lesions)" \
        if card.get("datasets") else ""
    local = sorted(set(map(str, datasets)))
    return shared, (f"{run} keeps {known}: check yourself that the sample's lesions are not among them (on those the "
                    f"posteriors are in-sample and the cut-offs come out too lax){data}"
                    + (f"; the local sample is {', '.join(local)}" if data and local else "")
                    + ". Runs trained now record every id (training_lesions.txt).")
