"""``dermfusion predict``: class probabilities for every lesion of a manifest, from bundles or run directories."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..console import console
from .common import fail, manifest as load_manifest


def predict_cmd(
    bundles: List[Path] = typer.Argument(..., help="bundle(s) or training run directory(ies); several bundles "
                                        "are averaged (raw probabilities, then one calibration)"),
    manifest: Path = typer.Option(...),
    out: Path = typer.Option(..., help="the official-format file: lesion_id,<class …> (MILK10k submission format; "
                                       "headed image for ISIC 2018 / 2019 and Derm7pt, as their official format)"),
    clinical: Optional[Path] = typer.Option(None, help="also write the clinical file: id, the posteriors (rows sum "
                                                       "to 1), action (monitor / routine_referral / urgent_referral / "
                                                       "cannot_assess) at the operating point, differential (the "
                                                       "conformal set, codes joined by |)"),
    tta: Optional[int] = typer.Option(None, help="test-time augmentation views (default: the bundle's, as it was "
                                                 "validated — train.tta of its config; 0 = none)"),
    output: str = typer.Option("auto", help="what the official-format file carries: auto | balanced (the "
                                            "balanced-accuracy rule's scores: ISIC / Derm7pt) | posterior | "
                                            "submission (MILK10k: cuts rescaled to 0.5); auto = submission for "
                                            "milk10k, else balanced"),
    service_config: Optional[Path] = typer.Option(None, help="service.yaml whose clinical settings apply (deployment "
                                                             "prior, an operating-point override, coverage level, "
                                                             "quality gate); default: the bundle's own"),
    device: str = typer.Option("cpu"),
    batch_size: int = typer.Option(32),
    backend: str = typer.Option("auto", help="network bundles: auto (the one policy: exact backends — ONNX Runtime "
                                             "float32 — plus approximate ones the bundle's agreement record "
                                             "approves for this CPU; fp32 if none is faster) | trained | fp32 | bf16 "
                                             "| autocast | int8 | onnx | onnx-int8 | compile"),
    concept_model: Optional[str] = typer.Option(None, help="compute the concept scores the manifest lacks with this "
                                                           "scorer (as `dermfusion concepts` takes it), on the scale "
                                                           "of the concept mapping the bundle carries"),
    concept_weights: Optional[Path] = typer.Option(None, help="local weights for --concept-model open_clip:<arch> / "
                                                              "dermlip:…"),
):
    """Predict every lesion of a manifest through the clinical engine (the same path as the service's
    /v1/analyze): the official-format file, and with --clinical the posteriors, triage action and differential.

    Under torchrun (`torchrun --nproc-per-node N --no-python dermfusion predict …`) every process predicts a
    contiguous shard of the manifest on its own device and rank 0 writes one merged file in manifest order."""
    from ..clinical import Engine
    from ..data.predictions import write_predictions
    from ..inference import load_run
    from ..inference.backends import list_backends
    from ..inference.predict_loop import predict_frame_sharded
    from ..runtime.distributed import distributed_session, record_errors, run_collectively
    from ..clinical.settings import load_clinical_settings

    if backend not in {"auto", "trained", *list_backends()}:
        raise typer.BadParameter(f"unknown backend {backend!r}: use auto, trained or one of "
                                 f"{', '.join(list_backends())}", param_hint="--backend")
    if output not in {"auto", "balanced", "posterior", "submission"}:
        raise typer.BadParameter(f"unknown output {output!r}: auto, balanced, posterior or submission",
                                 param_hint="--output")

    def run() -> None:
        with distributed_session(device) as ctx:
            df = load_manifest(manifest)
            dev = str(ctx.device(device)) if ctx.launched else device
            if concept_model:  # every process scores the same manifest (the content-hash cache shares the work)
                df = _fill_concepts(df, concept_model, concept_weights, bundles, dev, ctx.is_main)
            # bundles, run directories (network: fold bundles; tabular: the calibrated refit) or both, averaged
            pred = run_collectively(ctx, lambda: load_run(bundles, device=dev, batch_size=batch_size, backend=backend),
                                    what="loading the bundle(s)", gather=False)
            settings = load_clinical_settings(service_config)
            settings = settings.model_copy(update={"backend": backend})
            engine = Engine(pred, settings, tta=tta)
            if engine.model_pass.networks:
                # every rank checks the same lesions; rank 0's choice is used everywhere, so the shards agree
                sample = df.head(32)
                chosen = run_collectively(ctx, lambda: engine.choose_backends(sample), what="choosing the backend")[0]
                if ctx.distributed:
                    for net, name in zip(engine.model_pass.networks, chosen):
                        net.use_backend(name, sample)
                if ctx.is_main and backend == "auto":
                    console.print(f"backend: {_backend_text(chosen)} (the fastest the policy allows that matches "
                                  f"fp32 eager on {min(32, len(df))} lesions)")
                    _print_backend_checks(engine)
            task = pred.task
            mode = ("submission" if task.metric == "milk10k_dice" else "balanced") if output == "auto" else output
            if ctx.is_main:
                console.print(f"{len(df)} lesions · {engine.tta or 1} view(s) each"
                              + (" (the bundle's test-time augmentation)" if tta is None and engine.tta else ""))
            result = predict_frame_sharded(lambda part: _engine_rows(engine, part, batch_size, bool(clinical), ctx),
                                           df, ctx)
            C = task.num_classes
            raw, post, shown = result[:, :C], result[:, C:2 * C], result[:, 2 * C:3 * C]
            cal = pred.calibration
            official = {"balanced": cal.balanced, "posterior": cal.posterior,
                        "submission": lambda r: cal.apply(r, rescale_cuts=True)}[mode](raw)
            extra = _criteria_columns(engine, result[:, 4 * C + 1:])
            if ctx.is_main:
                write_predictions(out, df["lesion_id"], official, task, extra=extra, manifest=df)
                console.print(f"[green]wrote[/] {out}: {len(df)} lesions × {task.num_classes} classes ({mode})"
                              + (f" from {ctx.world_size} processes" if ctx.distributed else ""))
                if clinical:
                    _write_clinical(clinical, engine, df, shown, result[:, 3 * C], result[:, 3 * C + 1:4 * C + 1])
            ctx.barrier()

    record_errors(run)()


def _engine_rows(engine, part, batch_size: int, clinical: bool, ctx):
    """The engine over one shard, in chunks: N × (raw C | posterior C | shown C | action | set C | criteria ΣL), the
    criteria's label probabilities only for a multi-task network (``_criteria_columns``)."""
    import numpy as np

    from ..clinical.triage import ACTIONS
    from ..console import track
    from ..inference.criteria import report_probabilities

    task = engine.task
    chunks = engine.lesions_from_manifest(part, batch_size)
    n_chunks = (len(part) + batch_size - 1) // batch_size
    rows = []
    for lesions in (track(chunks, "predicting", total=n_chunks) if ctx.progress else chunks):
        bad = [(les.lesion_id, m, e) for les in lesions for m, e in les.errors.items()]
        if bad:
            lid, m, e = bad[0]
            fail(f"{lid}: its {m} image cannot be read ({e}); `dermfusion data check` lists every such file")
        # the criteria come from the same forward passes as the diagnosis (clinical.model_pass)
        for a in engine.assess(lesions, quality_gate=clinical, criteria=True):
            sets = np.zeros(task.num_classes) if a.prediction_set is None else \
                np.array([c in a.prediction_set for c in task.classes], dtype=float)
            if a.prediction_set is None:
                sets[:] = np.nan
            crit = [] if a.criteria is None else report_probabilities(engine.criteria, a.criteria)
            rows.append(np.concatenate([a.raw, a.posterior, a.shown, [ACTIONS.index(a.action)], sets, crit]))
    width = 4 * task.num_classes + 1 + sum(len(c.labels) for c in engine.criteria)
    return np.array(rows) if rows else np.zeros((0, width))


def _write_clinical(path, engine, df, shown, actions, sets) -> None:
    """The clinical file: the dataset's id, the shown posteriors, the action, the conformal differential."""
    import numpy as np
    import pandas as pd

    from ..clinical.triage import ACTIONS
    from ..data.predictions import prediction_ids

    task = engine.task
    header, ids = prediction_ids(df, task)
    out = pd.DataFrame(shown, columns=list(task.classes))
    out.insert(0, header, ids)
    out["action"] = [ACTIONS[int(a)] for a in actions]
    if np.isfinite(sets).all():
        out["differential"] = ["|".join(c for j in np.argsort(-shown[i]) for c in [task.classes[j]] if sets[i, j])
                               for i in range(len(shown))]
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, index=False, float_format="%.6f")
    rules = engine.rules
    counts = out["action"].value_counts().to_dict()
    console.print(f"[green]wrote[/] {path}: posteriors under the {rules.prior_info()['name']} prior; operating point "
                  f"from the {rules.operating_point_source}; actions " + ", ".join(f"{k} {v}" for k, v in counts.items())
                  + (f"; {rules.level:.0%} differential, mean size {sets.sum(1).mean():.2f}"
                     if "differential" in out else "; no differential (the bundle has no conformal calibration)"))


def _criteria_columns(engine, flat):
    """A multi-task network's criteria columns (label per criterion, the 7-point score, probabilities) from the
    engine's rows, or None."""
    from ..inference.criteria import criteria_frame, split_probabilities

    criteria = engine.criteria
    return criteria_frame(criteria, split_probabilities(criteria, flat)) if criteria else None


def _fill_concepts(df, model, weights, bundles, device, verbose):
    from .concepts import fill_for_bundles

    filled, report, mapping = fill_for_bundles(df, model, weights, bundles, device=device)
    if verbose:
        console.print(f"concepts: {report.supplied} supplied, {report.computed} computed "
                      f"({report.images_scored} images scored, {report.cache_hits} from the cache); mapping: "
                      f"{mapping if mapping else 'none in the bundle (raw scores)'}")
    return filled


def _print_backend_checks(engine) -> None:
    """Per network, what each candidate backend measured or why it was passed over, and the policy's reach."""
    from rich.markup import escape

    from ..inference.backend_policy import policy_text
    from ..inference.backends import selection_text

    members = engine.model_pass.networks
    if members:
        console.print(f"[dim]  policy: {escape(policy_text(members[0]))}[/]", highlight=False)
    for i, p in enumerate(members):
        if getattr(p, "selection", None):
            label = f"  network {i + 1}: " if len(members) > 1 else "  "
            console.print(f"[dim]{label}{escape(selection_text(p.selection, p.backend))}[/]", highlight=False)


def _backend_text(chosen) -> str:
    if isinstance(chosen, str):
        return chosen
    names = sorted(set(chosen))
    return names[0] if len(names) == 1 else ", ".join(chosen)
