"""What the fusion model's pooled representation attended to: image views, concepts, metadata fields.

``trimodal_fusion`` returns, with ``return_attention=True``, the pooling attention split into named
groups (``image`` per modality over its tokens, ``concept`` per concept column, ``metadata`` per
field, ``null``) and the semantic stage's attention of image tokens over the concept/metadata
tokens. Shares are fractions of the pooling attention (they sum to 1 with the null token).
Masked inputs (absent or unknown) get exactly zero and are reported as ``present: false``.
"""
from __future__ import annotations

import torch


def _row(t: torch.Tensor, r: int) -> float:
    return float(t[r].detach().float().sum()) if t.ndim > 1 else float(t[r].detach().float())


def concept_label(column: str) -> str:
    """concept_clinical_ulceration_crust -> clinical: ulceration crust."""
    rest = column.removeprefix("concept_")
    for m in ("clinical", "dermoscopic"):
        if rest.startswith(m + "_"):
            return f"{m}: {rest[len(m) + 1:].replace('_', ' ')}"
    return rest.replace("_", " ")


def fusion_contributions(attention: dict | None, model=None) -> list[dict]:
    """Per batch row: ``{"image": {mod: share}, "concepts": [...], "metadata": [...], "null": share,
    "semantic": [...]}``; an empty list when the model reports no attention."""
    if not attention or "image" not in attention:
        return []
    image, concept, meta = attention["image"], attention.get("concept", {}), attention.get("metadata", {})
    null = attention.get("null")
    b = next(iter(image.values())).shape[0] if image else (null.shape[0] if null is not None else 0)
    sem = attention.get("stages", {}).get("semantic")  # B×Tq×(1+K+F), column 0 = null key
    names = list(concept) + list(meta)
    out = []
    for r in range(b):
        row = {
            "image": {m: _row(w, r) for m, w in image.items()},
            "concepts": [{"name": c, "label": concept_label(c), "weight": _row(w, r), "present": _row(w, r) > 0}
                         for c, w in concept.items()],
            "metadata": [{"name": f, "label": f.replace("_", " "), "weight": _row(w, r), "present": _row(w, r) > 0}
                         for f, w in meta.items()],
            "null": _row(null, r) if null is not None else 0.0,
        }
        if sem is not None and sem.shape[-1] == 1 + len(names):
            s = sem[r].detach().float().mean(0)  # average over the image tokens that queried
            row["semantic"] = [{"name": n, "weight": float(s[1 + i])} for i, n in enumerate(names)]
            row["semantic_null"] = float(s[0])
        for group in ("concepts", "metadata"):
            row[group].sort(key=lambda d: -d["weight"])
        out.append(row)
    return out
