"""The ``dermfusion`` command: every verb, registered here explicitly.

Each verb lives in the module of its stage (``data``, ``bundle``, ``train``, ``concepts``, ``predict``, ``evaluate``,
``gate``, ``clinical`` (``operating-point``), ``combine``, ``perf``, ``service``, ``card``, ``shift``, ``demo``,
``lifecycle``, ``security``, ``weights``) as a plain function; this module wraps each in the one-line user-error guard
(``common.user_errors``) and adds it to the typer app. The verb modules import only typer and the console at module
level — the stages load when a verb runs — so ``dermfusion --help`` is quick.
"""
from __future__ import annotations

import typer

from . import (bundle, card, clinical, combine, concepts, data, demo, evaluate, gate, lifecycle, perf, predict, security, service,
               shift, train, weights)
from .common import user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Multi-modal skin-lesion diagnosis: clinical + dermoscopic images + metadata → "
                       "calibrated differential, risk score and triage.")
import_app = typer.Typer(no_args_is_help=True, help="Import a public dataset into a lesion manifest.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect manifests.")
bundle_app = typer.Typer(no_args_is_help=True, help="Check a bundle's integrity; add the quality gate's reference or "
                                                    "the concept mapping.")
registry_app = typer.Typer(no_args_is_help=True, help="The model registry: register versions, promote, shadow / "
                                                      "canary, roll back.")
keys_app = typer.Typer(no_args_is_help=True, help="Named API keys with scopes for the service.")
audit_app = typer.Typer(no_args_is_help=True, help="The service's audit trail: retention of stored images.")
weights_app = typer.Typer(no_args_is_help=True, help="Check downloaded foundation-model weights before training.")

# (typer app, verb, function) in the order `dermfusion --help` lists them
VERBS = [
    (import_app, "milk10k", data.import_milk10k_cmd),
    (import_app, "isic", data.import_isic_cmd),
    (import_app, "derm7pt", data.import_derm7pt_cmd),
    (import_app, "pad-ufes-20", data.import_pad_ufes_cmd),
    (app, "folds", data.folds_cmd),
    (data_app, "check", data.data_check_cmd),
    (data_app, "combine", data.data_combine_cmd),
    (app, "train", train.train_cmd),
    (app, "concepts", concepts.concepts_cmd),
    (app, "predict", predict.predict_cmd),
    (app, "evaluate", evaluate.evaluate_cmd),
    (app, "gate", gate.gate_cmd),
    (app, "operating-point", clinical.operating_point_cmd),
    (app, "calibrate", combine.calibrate_cmd),
    (app, "stack", combine.stack_cmd),
    (app, "ensemble", combine.ensemble_cmd),
    (app, "card", card.card_cmd),
    (app, "shift", shift.shift_cmd),
    (app, "explain", service.explain_cmd),
    (app, "export", perf.export_cmd),
    (app, "bench", perf.bench_cmd),
    (app, "serve", service.serve_cmd),
    (app, "drift", service.drift_cmd),
    (app, "demo", demo.demo_cmd),
    (bundle_app, "verify", bundle.verify_cmd),
    (bundle_app, "seal", bundle.seal_cmd),
    (bundle_app, "reference", bundle.reference_cmd),
    (bundle_app, "check-backends", bundle.check_backends_cmd),
    (bundle_app, "concept-mapping", concepts.bundle_mapping_cmd),
    (registry_app, "register", lifecycle.register_cmd),
    (registry_app, "list", lifecycle.list_cmd),
    (registry_app, "promote", lifecycle.promote_cmd),
    (registry_app, "shadow", lifecycle.shadow_cmd),
    (registry_app, "rollback", lifecycle.rollback_cmd),
    (app, "feedback", lifecycle.feedback_cmd),
    (app, "performance", lifecycle.performance_cmd),
    (keys_app, "new", security.keys_new_cmd),
    (audit_app, "purge", security.audit_purge_cmd),
    (weights_app, "check", weights.weights_check_cmd),
]
app.add_typer(import_app, name="import")
app.add_typer(data_app, name="data")
app.add_typer(bundle_app, name="bundle")
app.add_typer(registry_app, name="registry")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(weights_app, name="weights")
for _group, _name, _fn in VERBS:
    _group.command(_name)(user_errors(_fn))


def main() -> None:
    """The console-script entry point (``dermfusion = "dermfusion.cli:main"``)."""
    app()
