"""`dermfusion data check`: find every problem in a manifest before training meets it mid-epoch."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from .features import SITES, SKIN_TONES, SEXES
from .folds import group_keys
from .images import ImageError, read_image
from .manifest import IMAGE_COLUMNS, concept_columns, label_columns


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    check: str
    message: str


@dataclass
class CheckReport:
    n_lesions: int
    findings: list[Finding] = field(default_factory=list)
    class_counts: pd.DataFrame | None = None
    images_checked: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def add(self, severity: str, check: str, message: str) -> None:
        self.findings.append(Finding(severity, check, message))


def _examples(items, n=3) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def check_manifest(df: pd.DataFrame, decode_images: bool = True, progress=None) -> CheckReport:
    rep = CheckReport(n_lesions=len(df))
    dup = df["lesion_id"][df["lesion_id"].duplicated()]
    if len(dup):
        rep.add("error", "duplicate lesion ids", f"{dup.nunique()} id(s) repeated: {_examples(dup.unique())}")
    if (df["lesion_id"] == "").any():
        rep.add("error", "empty lesion ids", f"{(df['lesion_id'] == '').sum()} row(s) have no lesion_id")

    # images
    paths = {m: df[col] for m, col in IMAGE_COLUMNS.items() if col in df.columns}
    with_images = {m: int((p != "").sum()) for m, p in paths.items()}
    if sum(with_images.values()) == 0:
        rep.add("info", "images", "no image paths: a metadata/concept-only manifest (tabular models only); "
                "import with --images to attach images")
    for m, n in with_images.items():
        if 0 < n < len(df):
            rep.add("info", "missing modality", f"{len(df) - n} lesion(s) without a {m} image (masked in training)")
    all_paths = pd.concat([p[p != ""] for p in paths.values()]) if paths else pd.Series(dtype=str)
    shared = all_paths[all_paths.duplicated(keep=False)]
    if len(shared):
        rep.add("error", "image used twice", f"{shared.nunique()} image(s) used by more than one lesion/view: "
                f"{_examples(shared.unique())}")
    bad: list[str] = []
    missing: list[str] = []
    items = list(all_paths.unique())
    it = progress(items, "checking images") if progress and items else items
    for p in it:
        try:
            if decode_images:
                read_image(p)
            elif not __import__("os").path.exists(p):
                raise ImageError(f"{p}: file not found")
            rep.images_checked += 1
        except ImageError as e:
            (missing if "not found" in str(e) else bad).append(str(e))
    if missing:
        rep.add("error", "missing images", f"{len(missing)} file(s) not found: {_examples(missing)}")
    if bad:
        rep.add("error", "unreadable images", f"{len(bad)} file(s): {_examples(bad)}")

    # folds
    if "fold" in df.columns and (df["fold"] >= 0).any():
        keys = group_keys(df)
        folds_per_group = pd.Series(df["fold"].to_numpy()).groupby(keys).nunique()
        leaks = folds_per_group[folds_per_group > 1]
        if len(leaks):
            rep.add("error", "fold leakage", f"{len(leaks)} lesion group(s)/patient(s) in more than one fold: "
                    f"{_examples(leaks.index)}")
        labs = label_columns(df)
        if labs:
            lab = df[df["fold"] >= 0]
            rep.class_counts = lab.groupby("fold")[labs].sum().astype(int)
            rep.class_counts.columns = [c.removeprefix("label_") for c in labs]
            empty = [(f, c) for f, row in rep.class_counts.iterrows() for c, v in row.items() if v == 0]
            if empty:
                rep.add("warning", "empty class in fold", f"{len(empty)} (fold, class) cell(s) have no lesion: "
                        f"{_examples(empty)}")

    # labels
    labs = label_columns(df)
    if labs:
        lv = df[labs]
        part = lv.notna().any(axis=1) & lv.isna().any(axis=1)
        if part.any():
            rep.add("error", "partial labels", f"{part.sum()} row(s) with some label columns empty")
        full = lv.notna().all(axis=1)
        sums = lv[full].sum(axis=1)
        if (~sums.between(0.99, 1.01)).any():
            rep.add("error", "labels not one-hot", f"{(~sums.between(0.99, 1.01)).sum()} row(s) whose labels do not sum to 1")
        if rep.class_counts is None and full.any():
            rep.class_counts = lv[full].sum().astype(int).to_frame("all").T
            rep.class_counts.columns = [c.removeprefix("label_") for c in labs]
    else:
        rep.add("info", "labels", "no label columns: an unlabelled (test) manifest")

    # metadata ranges
    age = df["age"]
    out = age[(age < 0) | (age > 120)]
    if len(out):
        rep.add("error", "age out of range", f"{len(out)} value(s) outside 0–120: {_examples(out.unique())}")
    for col, vocab in (("sex", SEXES), ("skin_tone", SKIN_TONES), ("site", SITES)):
        vals = df[col][(df[col] != "") & ~df[col].isin(vocab)]
        if len(vals):
            rep.add("warning", f"unknown {col}", f"{len(vals)} value(s) outside the vocabulary "
                    f"(treated as unknown): {_examples(Counter(vals).most_common())}")
    for col in ("age", "sex", "skin_tone", "site"):
        n = int((df[col].isna() | (df[col] == "")).sum()) if col != "age" else int(df[col].isna().sum())
        if n:
            rep.add("info", f"missing {col}", f"{n} lesion(s) ({n / max(len(df), 1):.1%}) — masked as unknown")
    cc = concept_columns(df)
    if cc:
        vals = df[cc]
        oob = ((vals < 0) | (vals > 1)).sum().sum()
        if oob:
            rep.add("warning", "concept range", f"{oob} concept score(s) outside [0, 1]")
    return rep
