"""Model cards (Mitchell et al., "Model Cards for Model Reporting", 2019) for clinicians and regulators.

A card is built from files only — the bundle (config.yaml, calibration.json, metrics.json, VERSION, HASH),
the training run around it (summary.json, oof.csv), optionally the training manifest, an evaluation directory
written by ``dermfusion evaluate`` (metrics.json: CIs, fairness slices, provenance) and a ``shift.json``
written by ``dermfusion shift`` — and every section names the file (and date) its figures came from. Where
a source is missing the card says so; it never fills a gap with a number from elsewhere.

``write_model_card(bundle)`` writes model_card.json / .md / .html into the bundle (documentation, excluded
from the bundle's content hash). ``dermfusion train`` writes a minimal card for every bundle of a run
(``write_run_cards``); ``dermfusion card`` rewrites them with evaluation and shift results; the service
serves the card at ``GET /v1/model-card``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..bundle import find_run_dir, read_bundle, run_bundles
from ..console import err_console
from .evidence import calibration_section, covariate_shift_section, provenance_section, subgroups_section
from .failure_modes import failure_modes_section
from .performance import evaluation_block, oof_metrics, summary_block
from .render import render_html, render_markdown
from .sections import intended_use_section, model_details_section, training_data_section
from .sources import N_BOOTSTRAP, as_number, jsonable, now_utc, read_json, source_ref

CARD_SCHEMA = "dermfusion.model_card/1"
CARD_FILES = ("model_card.json", "model_card.md", "model_card.html")


def build_model_card(bundle_dir, *, manifest=None, evaluation_dir=None, shift_json=None,
                     oof: dict | None = None, ensemble: dict | None = None, previous: dict | None = None,
                     n_bootstrap: int = N_BOOTSTRAP) -> dict:
    """The model card of a bundle as a dict (JSON-able).

    manifest: the training manifest (path or DataFrame) → training data, provenance mix, OOF CIs.
    evaluation_dir: a `dermfusion evaluate` output (metrics.json) → held-out metrics, subgroups, provenance.
    shift_json: a `dermfusion shift` result. oof: precomputed out-of-fold block (several bundles of one run).
    previous: an earlier card of the same bundle (same hash) whose sections are kept where no new source is given.
    """
    b = read_bundle(bundle_dir)
    run_dir = find_run_dir(b.path)
    if previous and previous.get("model_details", {}).get("bundle_hash") != b.content_hash:
        previous = None
    prev = previous or {}
    card: dict = {"schema": CARD_SCHEMA, "generated": now_utc(), "generator": f"dermfusion {__version__}"}
    card["model_details"] = model_details_section(b, run_dir, ensemble)
    card["intended_use"] = intended_use_section(b, card["model_details"])
    if manifest is not None:
        card["training_data"] = training_data_section(b, manifest)
    elif (prev.get("training_data") or {}).get("available"):
        card["training_data"] = prev["training_data"]
    else:
        card["training_data"] = {"available": False, "source": [],
                                 "note": "the training manifest is not stored in the bundle: no training-data "
                                         "summary (rewrite with `dermfusion card BUNDLE --manifest TRAINING_MANIFEST`)"}
    perf: dict = {"evaluation": None, "out_of_fold": None, "bundle_validation": None}
    ev: dict = {}
    if evaluation_dir is not None:
        perf["evaluation"], ev = evaluation_block(Path(evaluation_dir))
        if perf["evaluation"] is None:
            perf["evaluation_note"] = f"{Path(evaluation_dir) / 'metrics.json'} is missing or not JSON"
    elif (prev.get("performance") or {}).get("evaluation"):
        perf["evaluation"] = prev["performance"]["evaluation"]
    if oof is None and run_dir is not None and manifest is not None:
        oof = oof_metrics(run_dir, b.task, manifest, b.calibration, n_bootstrap)
    if oof is None and (prev.get("performance") or {}).get("out_of_fold", {}) and \
            any(r.get("ci") for r in prev["performance"]["out_of_fold"].get("headline", [])):
        oof = prev["performance"]["out_of_fold"]
    if oof is None and run_dir is not None:
        oof = summary_block(run_dir)
    perf["out_of_fold"] = oof
    bm = {k: v for k, v in (b.metrics or {}).items() if as_number(v) is not None}
    if bm:
        perf["bundle_validation"] = {"metrics": bm, "source": [source_ref(b.path / "metrics.json",
                                                                    what="validation metrics at save time")]}
    if not perf["evaluation"] and not perf["out_of_fold"]:
        perf["note"] = ("No performance figures available: no evaluation directory was given and the bundle's run "
                        "has no out-of-fold predictions. Evaluate on held-out data (`dermfusion evaluate`) and "
                        "rewrite the card with `dermfusion card BUNDLE --evaluation DIR`.")
    card["performance"] = perf
    if ev:
        src = perf["evaluation"]["source"]
        card["subgroups"], card["provenance_results"] = subgroups_section(ev, src), provenance_section(ev, src)
    elif perf["evaluation"] and prev.get("subgroups"):
        card["subgroups"], card["provenance_results"] = prev["subgroups"], prev.get("provenance_results") or {}
    else:
        none = {"available": False, "source": [], "note": "no evaluation attached (`dermfusion card --evaluation DIR`)"}
        card["subgroups"], card["provenance_results"] = dict(none), dict(none)
    if shift_json is None and not isinstance(ev.get("shift"), dict) and (prev.get("covariate_shift") or {}).get("available"):
        card["covariate_shift"] = prev["covariate_shift"]
    else:
        card["covariate_shift"] = covariate_shift_section(Path(shift_json) if shift_json is not None else None, ev,
                                                   (perf["evaluation"] or {}).get("source"))
    card["calibration"] = calibration_section(b, perf)
    card["failure_modes"] = failure_modes_section(card, b)
    return jsonable(card)


def write_model_card(bundle_dir, *, manifest=None, evaluation_dir=None, shift_json=None, oof: dict | None = None,
                     ensemble: dict | None = None, keep_previous: bool = True) -> dict:
    """Build the card and write model_card.json / .md / .html into the bundle; returns the card."""
    bundle_dir = Path(bundle_dir)
    previous = read_json(bundle_dir / "model_card.json") if keep_previous else None
    card = build_model_card(bundle_dir, manifest=manifest, evaluation_dir=evaluation_dir, shift_json=shift_json,
                            oof=oof, ensemble=ensemble, previous=previous)
    (bundle_dir / "model_card.json").write_text(json.dumps(card, indent=2))
    (bundle_dir / "model_card.md").write_text(render_markdown(card), encoding="utf-8")
    (bundle_dir / "model_card.html").write_text(render_html(card), encoding="utf-8")
    return card


def write_run_cards(path, *, manifest=None, evaluation_dir=None, shift_json=None, strict: bool = True,
                    keep_previous: bool = True) -> list[Path]:
    """Write the card of every bundle of a run (or of one bundle). With ``strict=False`` (end of training) a
    failure is reported as a warning and never fails the run. Returns the bundles written."""
    try:

        bundles, run_dir = run_bundles(path)
        if not bundles:
            return []
        first = read_bundle(bundles[0])
        oof = oof_metrics(run_dir, first.task, manifest, first.calibration) \
            if run_dir is not None and manifest is not None else None
        fold_bundles = (read_json(run_dir / "summary.json") or {}).get("bundles") or [] if run_dir else []
        ens = {"n_members": len(fold_bundles), "run": str(run_dir),
               "note": f"one of the {len(fold_bundles)} bundles of this run; serving the run directory averages them"} \
            if len(fold_bundles) > 1 else None
        for q in bundles:
            qb = read_bundle(q)
            same = qb.calibration == first.calibration  # the precomputed OOF block used that calibration
            write_model_card(q, manifest=manifest, evaluation_dir=evaluation_dir, shift_json=shift_json,
                             oof=oof if same else None, ensemble=ens if qb.kind != "average" else None,
                             keep_previous=keep_previous)
        return bundles
    except Exception as e:  # noqa: BLE001
        if strict:
            raise

        err_console.print(f"[yellow]warning:[/] model card not written ({type(e).__name__}: {e}); "
                          "write it later with `dermfusion card RUN --manifest M`")
        return []


def card_for_service(served: Path | None, members: list[Path] | None = None) -> dict:
    """The card of the model a service serves: the served bundle's stored card, else its first member's
    (a fold ensemble), else one built on the fly from the bundle alone. An ensemble of N members says so."""
    members = [Path(m) for m in (members or [])]
    candidates = ([Path(served)] if served else []) + members[:1]
    if not candidates:
        raise ValueError("no bundle to describe")
    for p in candidates:
        c = read_json(p / "model_card.json")
        if c and "model_details" in c:
            card, origin = dict(c), source_ref(p / "model_card.json", c.get("generated"), "stored in the bundle")
            break
    else:
        target = members[0] if members else candidates[0]
        card = build_model_card(target)
        origin = {"file": None, "date": card["generated"], "what": f"built on the fly from the bundle {target} alone"}
    card["served"] = {"origin": origin, "n_bundles": max(len(members), 1)}
    if len(members) > 1:
        card["model_details"] = {**card["model_details"], "ensemble": {
            "n_members": len(members),
            "note": f"the service averages {len(members)} bundles; this card describes the first of them"}}
    return card
