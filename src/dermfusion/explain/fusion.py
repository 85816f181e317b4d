"""What the fusion model's pooled representation attended to: image views, concepts, metadata fields.

``trimodal_fusion`` returns, with ``return_attention=True``, the pooling attention split into named
groups (``image`` per modality over its tokens, ``concept`` per concept column, ``metadata`` per
field, ``null``) and the semantic stage's attention of image tokens over the concept/metadata
tokens. Shares are fractions of the pooling attention (they sum to 1 with the null token).

``present`` says whether the *input* was given (from the batch's presence masks), never inferred from the
weight: absent concepts and unknown categorical fields (sex, site, skin tone) are masked, so their share is
exactly 0; an absent numeric field (age) is replaced by its learned "unknown" token, which the model does
attend to — it is reported ``present: false`` with the share the model gave to "age unknown".
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


def _given(batch: dict | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(B×K concepts given, B×F metadata fields given — numeric first, then categorical with code 0 = unknown)
    from the model's input batch; (None, None) without one."""
    if batch is None or "numeric_present" not in batch:
        return None, None
    num = batch["numeric_present"].bool()
    cat = batch.get("categorical")
    meta = torch.cat([num, cat.long() > 0], 1) if cat is not None else num
    concepts = batch.get("concepts_present")
    return (concepts.bool() if concepts is not None else None), meta


def fusion_contributions(attention: dict | None, model=None, batch: dict | None = None) -> list[dict]:
    """Per batch row: ``{"image": {mod: share}, "concepts": [...], "metadata": [...], "null": share,
    "semantic": [...]}``; an empty list when the model reports no attention. ``batch`` (the model's input) gives
    ``present``; without it a positive share counts as present."""
    if not attention or "image" not in attention:
        return []
    image, concept, meta = attention["image"], attention.get("concept", {}), attention.get("metadata", {})
    null = attention.get("null")
    b = next(iter(image.values())).shape[0] if image else (null.shape[0] if null is not None else 0)
    sem = attention.get("stages", {}).get("semantic")  # B×Tq×(1+K+F), column 0 = null key
    names = list(concept) + list(meta)
    given_c, given_m = _given(batch)
    given_c = given_c if given_c is not None and given_c.shape[-1] == len(concept) else None
    given_m = given_m if given_m is not None and given_m.shape[-1] == len(meta) else None

    def present(given, r: int, i: int, weight: float) -> bool:
        return bool(given[r, i]) if given is not None else weight > 0

    out = []
    for r in range(b):
        row = {
            "image": {m: _row(w, r) for m, w in image.items()},
            "concepts": [{"name": c, "label": concept_label(c), "weight": _row(w, r),
                          "present": present(given_c, r, i, _row(w, r))} for i, (c, w) in enumerate(concept.items())],
            "metadata": [{"name": f, "label": f.replace("_", " "), "weight": _row(w, r),
                          "present": present(given_m, r, i, _row(w, r))} for i, (f, w) in enumerate(meta.items())],
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
