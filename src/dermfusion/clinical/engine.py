"""The clinical engine: one path from a lesion to a decision, for every caller.

    lesions (decoded images + metadata, ``clinical.lesion``)
      → quality gate, image checks (``clinical.quality``)
      → model pass: networks on their backend, test-time views, members combined (``clinical.model_pass``)
      → posterior under the training prior (the bundle's calibration) → shown posterior (deployment prior, if set)
      → decisions: balanced diagnosis · triage action at the operating point · conformal differential
        (``clinical.decisions``) · review flags (``clinical.triage``)
      → gate's model and familiarity checks → "cannot assess" overrules the action
      → explanation on demand (heat maps, fusion attention, the 7-point criteria)

``dermfusion predict``, ``gate``, ``explain``, ``bench`` and the service's ``/v1/analyze`` all call
``Engine.assess``; the same bundle and lesion give the same numbers everywhere, by construction.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..evaluation.drift_reference import read_reference_stats
from ..evaluation.embedding_reference import read_reference
from ..inference.criteria import criteria_report
from ..inference.predictor import Predictor
from ..tasks import TaskSpec
from .decisions import DecisionRules
from .lesion import METADATA_FIELDS, Lesion, lesion_from_row, lesions_from_manifest
from .model_pass import ModelPass, bundle_tta
from .quality import QualityGate
from .settings import ClinicalSettings
from .triage import TriageDecision, cannot_assess, class_name, decide


@dataclass
class Assessment:
    """Everything the engine concluded about one lesion."""

    lesion_id: str
    raw: np.ndarray                    # C, the combined raw network output (before calibration)
    posterior: np.ndarray              # C, under the training prior — what decisions are made on
    shown: np.ndarray                  # C, what a clinician sees (deployment prior when set)
    balanced: np.ndarray               # C, the balanced rule's scores (challenge files)
    prediction_set: list[str] | None   # the conformal differential, most probable first (None: no calibration)
    decision: TriageDecision
    findings: list[tuple[str, str]] = field(default_factory=list)   # "cannot assess" reasons
    measures: dict = field(default_factory=dict)                    # image measures per modality
    unfamiliarity: float | None = None
    maps: dict = field(default_factory=dict)                        # modality -> heat-map grid
    methods: dict = field(default_factory=dict)
    contributions: dict = field(default_factory=dict)
    criteria: dict | None = None
    missing_images: list[str] = field(default_factory=list)
    missing_metadata: list[str] = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)                  # of the batch it was assessed in

    @property
    def assessable(self) -> bool:
        return not self.findings

    @property
    def action(self) -> str:
        return self.decision.action


def familiarity_reference(predictor) -> dict | None:
    """The familiarity reference of the network whose layers the engine watches (the first one): a fold ensemble
    is checked against its first fold's validation lesions."""
    mix = predictor.mixture() if hasattr(predictor, "mixture") else []
    first = mix[0][1] if mix else predictor
    return read_reference(getattr(getattr(first, "bundle", None), "path", None))


class Engine:
    """A served predictor with its decision rules and settings: ``assess(lesions)`` → ``Assessment`` per lesion."""

    def __init__(self, predictor: Predictor, settings: ClinicalSettings | None = None, *, tta: int | None = None):
        self.settings = ClinicalSettings.of(settings)
        self.predictor = predictor
        self.task: TaskSpec = predictor.task
        self.model_pass = ModelPass(predictor)
        self.rules = DecisionRules.of(predictor, self.settings)
        path = getattr(predictor.bundle, "path", None)
        # the model check's cut: from the decisions fitted on the out-of-fold posteriors (hashed with the bundle);
        # an older bundle's from its drift reference
        model_check = predictor.decisions.get("model_check")
        reference = {"quality_gate": model_check} if model_check else (read_reference_stats(path) if path else None)
        self.gate = QualityGate(self.settings.quality, reference, familiarity_reference(predictor))
        # test-time views: each network's own (train.tta of its config) unless the caller sets one number for all
        self._tta = None if tta is None else int(tta)
        self.tta = bundle_tta(predictor) if tta is None else int(tta)
        first = self.model_pass.networks[0] if self.model_pass.networks else None
        # the share of the short side each modality's evaluation crop keeps (the heat map's "model region")
        self.crop_pct = {m: float(p.crop_pct) for m, p in first.preprocess.items()} if first is not None else {}
        self.backends: list[str] = []

    @property
    def modalities(self) -> list[str]:
        return self.model_pass.modalities

    @property
    def metadata_fields(self) -> list[str]:
        return self.model_pass.metadata_fields

    @property
    def concepts(self) -> list[str]:
        return self.model_pass.concepts

    # ------------------------------------------------------------------ lesions from a manifest
    def lesion_from_row(self, row: dict) -> Lesion:
        """A manifest row as a lesion carrying every input this engine reads: its modalities' images, the standard
        metadata and any further field a model reads (e.g. Derm7pt's ``elevation``)."""
        return lesion_from_row(row, self.modalities, self._extra_fields())

    def lesions_from_manifest(self, df, chunk: int = 32):
        """The manifest's rows as such lesions, ``chunk`` at a time (images decoded one chunk at a time)."""
        return lesions_from_manifest(df, self.modalities, chunk, self._extra_fields())

    def _extra_fields(self) -> list[str]:
        return [f for f in self.metadata_fields if f not in METADATA_FIELDS]

    def choose_backends(self, sample=None) -> list[str]:
        """Each network's backend under the one policy (``settings.backend``: auto | trained | a name)."""
        self.backends = self.model_pass.choose_backends(self.settings.backend, self.gate.familiarity_modality, sample)
        return self.backends

    def assess(self, lesions: list[Lesion], *, explain: bool = False, quality_gate: bool = True,
               criteria: bool = True) -> list[Assessment]:
        """Assess ``lesions`` together (one batch per network and view). ``explain``: heat maps (meant for one
        lesion at a time); ``quality_gate``: the "cannot assess" checks (off for warm-up on synthetic images)."""
        if not lesions:
            return []
        task = self.task
        t0 = time.perf_counter()
        findings, measures = [], []
        for les in lesions:
            used = {m: img for m, img in les.images.items() if m in self.modalities}
            f, ms = self.gate.check_images(used) if quality_gate else ([], {})
            findings.append(list(f))
            measures.append(ms)
        t1 = time.perf_counter()
        watch = self.gate.familiarity_modality if quality_gate else None
        want_maps = bool(explain) and self.settings.explain.enabled and self.model_pass.explainer is not None
        res = self.model_pass.run(lesions, tta=self._tta, want_maps=want_maps, stats_modality=watch,
                                  want_criteria=criteria)
        crit = self._criteria(res.criteria, len(lesions))
        posterior = self.rules.posterior(res.raw)
        shown = self.rules.shown(posterior)
        balanced = self.rules.balanced(res.raw)
        sets = self.rules.prediction_sets(posterior)
        timings = {"quality_ms": (t1 - t0) * 1000, "model_ms": (time.perf_counter() - t1) * 1000}
        out = []
        for k, les in enumerate(lesions):
            missing_images = [m for m in self.modalities if m not in les.images]
            missing_meta = [f for f in self.metadata_fields if f not in les.metadata]
            unfam = None
            if watch and res.layer_stats is not None and watch in les.images and not findings[k]:
                unfam = self.gate.unfamiliarity(res.layer_stats[k:k + 1])
            if quality_gate:
                findings[k] += self.gate.check_familiarity(unfam) + self.gate.check_model(posterior[k])
            decision = decide(task, posterior[k], self.rules.operating_point, self.settings.uncertainty,
                              missing_images, missing_meta)
            if findings[k]:  # "cannot assess" overrules triage, and there is nothing to explain
                decision = cannot_assess(decision, findings[k])
            pset = None
            if sets is not None:
                pset = [task.classes[j] for j in np.argsort(-posterior[k]) if sets[k, j]]
            out.append(Assessment(
                lesion_id=les.lesion_id, raw=res.raw[k], posterior=posterior[k], shown=shown[k], balanced=balanced[k],
                prediction_set=pset, decision=decision, findings=findings[k], measures=measures[k],
                unfamiliarity=unfam, maps=(res.maps[k] if res.maps and not findings[k] else {}),
                methods=res.methods, contributions=(res.contributions[k] if res.contributions and not findings[k]
                                                    else {}),
                criteria=crit[k], missing_images=missing_images,
                missing_metadata=missing_meta, timings_ms=timings))
        return out

    @property
    def criteria(self) -> tuple:
        """The dermoscopic criteria the served networks predict (empty: none has criteria heads)."""
        heads = self.model_pass.criteria_heads
        return tuple(heads.criteria) if heads is not None else ()

    def _criteria(self, probs: dict | None, n: int) -> list[dict | None]:
        heads = self.model_pass.criteria_heads
        if probs is None or heads is None:
            return [None] * n
        return [criteria_report(heads.criteria, heads.criteria_set, probs, k) for k in range(n)]

    # ------------------------------------------------------------------ what a clinician reads
    def differential(self, a: Assessment) -> list[dict]:
        """Every class, most probable first (shown posteriors), each marked when it is in the prediction set."""
        task = self.task
        in_set = set(a.prediction_set or [])
        rows = [{"code": c, "name": class_name(task, c), "probability": float(p), "malignant": c in task.malignant,
                 "in_prediction_set": (c in in_set) if a.prediction_set is not None else None}
                for c, p in zip(task.classes, a.shown)]
        return sorted(rows, key=lambda d: -d["probability"])

    def prediction_set_report(self, a: Assessment) -> dict | None:
        if a.prediction_set is None:
            return None
        level = self.rules.level
        names = [class_name(self.task, c) for c in a.prediction_set]
        text = (f"with {level:.0%} confidence: " + (", ".join(a.prediction_set[:-1]) + " or " + a.prediction_set[-1]
                                                    if len(a.prediction_set) > 1 else a.prediction_set[0])
                if a.prediction_set else f"no class reaches {level:.0%} confidence (an unusual lesion: review)")
        return {"level": level, "classes": a.prediction_set, "names": names, "text": text,
                "method": (self.rules.conformal or {}).get("method"),
                "melanoma_in_set": ("MEL" in a.prediction_set) if "MEL" in self.task.classes else None}

    def clinical_payload(self, a: Assessment) -> dict:
        """The clinical fields of an answer (the API response and ``dermfusion explain``'s JSON share them)."""
        diff = self.differential(a)
        d = a.decision
        return {
            "differential": diff, "primary_diagnosis": diff[0],
            "prediction_set": self.prediction_set_report(a),
            "prior": self.rules.prior_info(),
            "operating_point": self.rules.operating_point_info(),
            "risk_score": round(float(100 * a.shown[list(self.task.malignant_indices)].sum()), 2),
            "risk_score_training_prior": round(d.risk_score, 2),
            "risk_classes": sorted(self.task.malignant),
            "action": d.action, "action_reasons": d.action_reasons,
            "review_recommended": d.review_recommended, "review_reasons": d.review_reasons,
            "uncertainty": {"normalized_entropy": d.normalized_entropy, "top_probability": d.top_probability,
                            "margin": d.margin},
            "quality": {"assessable": a.assessable, "reasons": [{"code": c, "message": m} for c, m in a.findings],
                        "measures": a.measures, "min_top_probability": self.gate.min_top_probability,
                        "unfamiliarity": a.unfamiliarity, "max_unfamiliarity": self.gate.max_unfamiliarity},
            "criteria": a.criteria if a.assessable else None,   # nothing to describe in an image not assessed
        }
