"""One analysis over HTTP's inputs: uploaded bytes + metadata -> the response payload, the audit record and the
drift observation. Used by the API (in worker threads).

What the product *decides* is not here: this module checks which uploads the model uses, decodes them
(``inputs``), fills concept scores the request lacks, and hands one in-memory lesion to the clinical engine
(``clinical.engine.Engine.assess``: quality gate → model pass → posteriors → decisions → explanation); it then
renders heat maps and writes what the engine concluded into the response, the audit row and the drift observation.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from .. import __version__
from ..bundle.concept_mapping import find_concept_mapping
from ..clinical import Engine, Lesion
from ..clinical.concept_scores import ConceptFiller
from ..clinical.explanation import fusion_explanation, render_heatmaps
from ..evaluation.drift_reference import image_stats, observation
from ..inference.predictor import Predictor
from ..tasks import MODALITIES
from .config import ServiceConfig
from .inputs import InputError, Upload, decode_upload, public_metadata
from .schemas import PatientMetadata

log = logging.getLogger("dermfusion.service")

__all__ = ["Analysis", "Analyzer", "InputError", "Upload"]


@dataclass
class Analysis:
    response: dict
    audit: dict
    observation: dict
    images: dict = field(default_factory=dict)   # modality -> (bytes, format) for optional storage
    posterior: object = None                     # C posteriors under the training prior (case-mix estimate); None
                                                 # when the lesion could not be assessed


class Analyzer:
    def __init__(self, predictor: Predictor, config: ServiceConfig | None = None):
        self.config = config or ServiceConfig()
        self.predictor = predictor
        self.bundle = predictor.bundle
        self.task = predictor.task
        self.engine = Engine(predictor, self.config)
        self.model_pass = self.engine.model_pass
        self.modalities = self.engine.modalities
        self.metadata_fields = self.engine.metadata_fields
        self.concepts = self.engine.concepts
        self.explainer = self.model_pass.explainer
        self.calibration = dict(self.bundle.calibration or {})
        self.calibrated = bool(self.calibration)
        path = getattr(self.bundle, "path", None)
        # the concept mapping the served bundle(s) carry (concept_mapping.json, hashed with the bundle), if any
        mapping = find_concept_mapping([path, *(n.bundle.path for n in self.model_pass.networks)]) \
            if self.config.concepts.model else None
        self.concept_filler = ConceptFiller(self.config.concepts, mapping)
        self.gate = self.engine.gate
        self.override_out_of_fold = self._announce_operating_point()
        self.ready = False
        self.backends: list[str] = []

    def _announce_operating_point(self) -> dict | None:
        """Log the operating point in force; for a service.yaml override, what it does on the bundle's out-of-fold
        lesions beside what the bundle's own operating point did (returned; also in /v1/model)."""
        rules = self.engine.rules
        first = self.model_pass.networks[0].bundle.path if self.model_pass.networks else self.bundle.path
        # what the override does on the lesions the served bundle's own point was chosen on (an ensemble's or a
        # refit's kept evidence), else on its first network's
        rates = rules.override_consequences(getattr(self.bundle, "path", None)) or rules.override_consequences(first)
        log.info("operating point (%s): %s", rules.operating_point_source, rules.operating_point)
        if rules.operating_point_source.startswith("service config"):
            own = ((self.predictor.decisions.get("triage") or {}).get("out_of_fold") or {}).get("in_sample")

            def said(r):
                return ("melanomas referred {:.1%}, malignant {:.1%}, benign referred {:.1%}, urgent {:.1%}".format(
                    r.get("melanoma_sensitivity", float("nan")), r["malignant_sensitivity"], r["benign_referral_rate"],
                    r["urgent_rate"]) if r else "not known (the bundle keeps no out-of-fold posteriors)")
            where = ((self.predictor.decisions.get("triage") or {}).get("evidence") or "out_of_fold").replace("_", " ")
            log.warning("triage cut-offs from service.yaml override the bundle's operating point; on the lesions "
                        "that point was chosen on (%s) the override: %s; the bundle's own: %s", where, said(rates),
                        said(own))
        elif rules.operating_point_source.startswith("built-in"):
            log.warning("the bundle carries no operating point: the built-in triage cut-offs apply, not chosen on "
                        "evidence (`dermfusion operating-point RUN` writes one)")
        return rates

    # --------------------------------------------------------------------------------------- info
    @property
    def model_ref(self) -> dict:
        b = self.bundle
        return {"name": b.name, "version": b.version or f"dermfusion {__version__}", "hash": b.content_hash,
                "task": self.task.name, "kind": b.kind, "members": self.model_pass.members}

    @property
    def can_explain(self) -> bool:
        return self.explainer is not None and self.config.explain.enabled

    def analyze(self, uploads: dict[str, Upload], metadata: PatientMetadata | None = None, *,
                request_id: str = "local", explain: bool = True, client: str | None = None,
                quality_gate: bool = True) -> Analysis:
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        metadata = metadata or PatientMetadata()
        if not uploads:
            raise InputError(400, "no_image", "no image: upload at least one of " +
                             ", ".join(f"'{m}'" for m in (self.modalities or MODALITIES)), None)
        warnings: list[str] = []
        received = [m for m in MODALITIES if m in uploads]
        unused = [m for m in received if m not in self.modalities]
        used = [m for m in received if m in self.modalities]
        for m in unused:
            warnings.append(f"a {m} image was uploaded but this model ({self.task.name}) does not use {m} images; "
                            "it was not analysed" if self.modalities else
                            f"a {m} image was uploaded but this model uses no images (concepts and metadata only)")
        if not used and self.modalities:
            raise InputError(422, "no_usable_image",
                             f"this model analyses {' and '.join(self.modalities)} images; none was uploaded "
                             f"(received: {', '.join(received)})", received[0] if received else None)

        t = time.perf_counter()
        images, formats, stats = {}, {}, {}
        for m in used:
            images[m], formats[m] = decode_upload(uploads[m], self.config.limits)
            stats[m] = image_stats(images[m])
        for m in unused:  # still validate what was sent: a broken file is an error either way
            img, _ = decode_upload(uploads[m], self.config.limits)
            if not self.modalities:
                stats[m] = image_stats(img)
        timings["decode_ms"] = (time.perf_counter() - t) * 1000

        fields = metadata.manifest_fields()
        model_fields = set(self.metadata_fields)
        metadata_used = {k: v for k, v in fields.items() if k in model_fields or k in self.concepts}
        # concept scores the request lacks, from its images when a scorer is configured (concept_scores.py)
        concept_fill = self.concept_filler.fill({m: uploads[m].data for m in used}, metadata_used, self.concepts)
        concepts_supplied, concepts_computed = concept_fill.supplied, list(concept_fill.computed)
        warnings += concept_fill.warnings
        given_meta = [k for k in ("age", "sex", "skin_tone", "site", "elevation") if k in fields]
        ignored = [k for k in given_meta if k not in model_fields]
        if ignored:
            warnings.append(f"metadata {', '.join(ignored)} given but not used by this model")
        unknown_concepts = sorted(k for k in fields if k.startswith("concept_") and k not in self.concepts)
        if unknown_concepts:
            warnings.append("concept scores not used by this model: " + ", ".join(
                c.removeprefix("concept_") for c in unknown_concepts[:10]))
        missing_meta = [k for k in self.metadata_fields if k not in fields]
        missing_images = [m for m in self.modalities if m not in used]

        t = time.perf_counter()
        lesion = Lesion(request_id, dict(images), metadata_used)
        assessment = self.engine.assess([lesion], explain=explain and self.can_explain, quality_gate=quality_gate)[0]
        timings["inference_ms"] = (time.perf_counter() - t) * 1000
        timings["quality_ms"] = assessment.timings_ms.get("quality_ms", 0.0)
        clinical = self.engine.clinical_payload(assessment)
        probs, task = assessment.shown, self.task

        t = time.perf_counter()
        heatmaps = render_heatmaps({m: images[m] for m in used}, assessment.maps, assessment.methods,
                                   self.engine.crop_pct, self.config.explain) if assessment.maps else []
        timings["explain_render_ms"] = (time.perf_counter() - t) * 1000
        if explain and not self.can_explain:
            warnings.append("explanations are not available for this bundle kind" if self.explainer is None
                            else "explanations are switched off in the service config")
        if self.engine.rules.operating_point_source.startswith("built-in"):
            warnings.append("the triage cut-offs are built-in defaults, not an operating point chosen on evidence "
                            "(`dermfusion operating-point RUN` writes one into the bundle)")
        now = datetime.now(timezone.utc)
        timings["analysis_ms"] = (time.perf_counter() - t_start) * 1000
        response = {
            "request_id": request_id, "created_at": now, "model": self.model_ref, **clinical,
            "inputs": {"modalities_received": received, "modalities_used": used, "modalities_missing": missing_images,
                       "metadata_used": public_metadata(metadata_used), "metadata_missing": missing_meta,
                       "image_sha256": {m: uploads[m].sha256 for m in received},
                       "image_size": {m: list(images[m].size) for m in used},
                       "concepts_supplied": concepts_supplied, "concepts_computed": concepts_computed},
            "warnings": warnings,
            "explanations": {"heatmaps": heatmaps, "fusion": fusion_explanation(assessment.contributions)},
            "calibrated": self.calibrated,
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
            "disclaimer": self.config.disclaimer,
        }
        d = assessment.decision
        audit = {
            "request_id": request_id, "created_at": now, "model_name": self.bundle.name,
            "model_version": self.model_ref["version"], "model_hash": self.bundle.content_hash, "task": task.name,
            "model_members": self.model_pass.members,  # every fold / member bundle, not only the first
            "input_hashes": {m: uploads[m].sha256 for m in received}, "input_stats": stats,
            "patient_metadata": metadata.model_dump(exclude_none=True),
            "outputs": {c: float(p) for c, p in zip(task.classes, probs)},
            "decisions": {"prior": clinical["prior"]["name"],
                          "posterior_training_prior": {c: float(p) for c, p in zip(task.classes, assessment.posterior)},
                          "prediction_set": assessment.prediction_set, "level": self.engine.rules.level,
                          "operating_point": {k: clinical["operating_point"][k] for k in (
                              "source", "urgent_risk", "routine_risk", "urgent_class_probability",
                              "routine_class_probability")}},
            "primary_class": clinical["primary_diagnosis"]["code"], "top_probability": d.top_probability,
            "risk_score": clinical["risk_score"], "action": d.action,
            "review_recommended": d.review_recommended, "review_reasons": d.review_reasons,
            "warnings": warnings, "client": client,
            # which concept scores were supplied, which computed (values, scorer, mapping): None if the model uses none
            "concepts": concept_fill.audit() if self.concepts else None,
        }
        # the drift reference was computed on training-prior posteriors: compare like with like (a deployment prior
        # would otherwise read as drift in the confidence and predicted-class signals)
        obs = observation(stats, assessment.posterior, task.classes)
        raw = {m: (uploads[m].data, formats[m]) for m in used} if self.config.audit.store_images else {}
        return Analysis(response, audit, obs, raw, None if assessment.findings else assessment.posterior)

    # ------------------------------------------------------------------------------------- warm-up
    def choose_backends(self) -> list[str]:
        """Each network's inference backend (``config.backend``; the one policy of ``inference.backend_policy``)."""
        self.backends = self.engine.choose_backends()
        return self.backends

    def warmup(self) -> float:
        """Backend choice, then one full analysis on synthetic images (JIT paths, allocator, thread pools);
        seconds taken."""
        t = time.perf_counter()
        self.choose_backends()
        rng = np.random.default_rng(0)
        uploads = {}
        for m in self.modalities or ["dermoscopic"]:
            arr = (rng.random((192, 256, 3)) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            uploads[m] = Upload(m, buf.getvalue(), "image/png")
        # noise would fail the quality gate; warm-up must run the full path, heat maps included
        self.analyze(uploads, PatientMetadata(), request_id="warmup", explain=True, quality_gate=False)
        self.ready = True
        return time.perf_counter() - t
