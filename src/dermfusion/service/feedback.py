"""Confirmed diagnoses as clinical data: how strongly each kind of confirmation establishes a diagnosis, why one
may be amended, and which of a request's feedback rows counts (``resolve_feedback``) — the rule the audit store
applies when it writes (``AuditStore.write_feedback``) and when the performance report reads
(``AuditStore.confirmed_cases``).

Rows are never overwritten. The first confirmation counts; a *stronger* one replaces it (histology after a
follow-up); a weaker or equal one is kept beside it — and, when it names another diagnosis, flagged as a conflict;
only an explicit amendment, with an enumerated reason, replaces a confirmation whatever its strength, and names
the row it replaces.
"""
from __future__ import annotations

FEEDBACK_CONFIRMATIONS = ("histology", "follow_up", "consensus", "confocal")
# how strongly a confirmation establishes the diagnosis: histopathology, then reflectance confocal microscopy, then
# an unchanged lesion on follow-up, then an expert consensus on the images
CONFIRMATION_STRENGTH = {"histology": 4, "confocal": 3, "follow_up": 2, "consensus": 1}
# why a confirmed diagnosis is replaced (enumerated: no free text reaches the audit trail)
AMENDMENT_REASONS = ("entry_error", "revised_report", "second_review", "wrong_lesion")


def resolve_feedback(rows: list[dict]) -> tuple[dict | None, dict]:
    """(the feedback row that counts, flags) for one request's rows in the order written. Flags: ``conflict`` (a row
    since the last amendment names another diagnosis than the one that counts), ``amended`` (amendments so far),
    ``replaced`` (rows replaced by a stronger confirmation or an amendment)."""
    current, since, amended, replaced = None, [], 0, 0
    for r in rows:
        if (r.get("kind") or "confirmation") == "amendment":
            replaced += current is not None
            current, since, amended = r, [], amended + 1
        elif current is None:
            current = r
        else:
            since.append(r)
            if CONFIRMATION_STRENGTH.get(r["confirmation"], 0) > CONFIRMATION_STRENGTH.get(current["confirmation"], 0):
                since.append(current)
                current, replaced = r, replaced + 1
    conflict = current is not None and any(r["diagnosis"] != current["diagnosis"] for r in since)
    return current, {"conflict": conflict, "amended": amended, "replaced": replaced}
