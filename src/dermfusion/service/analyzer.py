"""One analysis, end to end and independent of HTTP: uploaded bytes + metadata -> the response payload,
the audit record and the drift observation. Used by the API (in worker threads) and by
``dermfusion explain``.

Steps: decode (safely, ``inputs``) → check which inputs the model uses → the quality gate's image checks →
the model pass (``model_pass``: the networks' raw probabilities combined as the predictor combines them, then its
one calibration; the first network explained unless the gate already refused) → the gate's model check → triage
(or ``cannot_assess``) → heat-map overlays at the original aspect ratio.
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
from ..evaluation.drift_reference import image_stats, observation, read_reference_stats
from ..evaluation.embedding_reference import read_reference
from ..explain import center_crop_box, overlay_heatmap, png_base64
from ..explain.overlay import display_size
from ..inference.predictor import Predictor
from ..tasks import MODALITIES
from .concept_scores import ConceptFiller
from .config import ServiceConfig
from .inputs import InputError, Upload, decode_upload, public_metadata
from .model_pass import ModelPass
from .schemas import PatientMetadata
from .triage import QualityGate, cannot_assess, class_name, decide

log = logging.getLogger("dermfusion.service")

__all__ = ["Analysis", "Analyzer", "InputError", "Upload"]


@dataclass
class Analysis:
    response: dict
    audit: dict
    observation: dict
    images: dict = field(default_factory=dict)   # modality -> (bytes, format) for optional storage


class Analyzer:
    def __init__(self, predictor: Predictor, config: ServiceConfig | None = None):
        self.config = config or ServiceConfig()
        self.predictor = predictor
        self.bundle = predictor.bundle
        self.task = predictor.task
        self.model_pass = ModelPass(predictor)
        self.modalities = self.model_pass.modalities
        self.metadata_fields = self.model_pass.metadata_fields
        self.concepts = self.model_pass.concepts
        self.explainer = self.model_pass.explainer
        self.calibration = dict(self.bundle.calibration or {})
        self.calibrated = bool(self.calibration)
        path = getattr(self.bundle, "path", None)
        # the concept mapping the served bundle(s) carry (concept_mapping.json, hashed with the bundle), if any
        mapping = find_concept_mapping([path, *(n.bundle.path for n in self.model_pass.networks)]) \
            if self.config.concepts.model else None
        self.concept_filler = ConceptFiller(self.config.concepts, mapping)
        # the share of the short side each modality's evaluation crop keeps (the heat map's "model region")
        first = self.model_pass.networks[0] if self.model_pass.networks else None
        self.crop_pct = {m: float(p.crop_pct) for m, p in first.preprocess.items()} if first is not None else {}
        self.gate = QualityGate(self.config.quality, read_reference_stats(path) if path else None,
                                familiarity_reference(predictor))
        self.ready = False
        self.backends: list[str] = []

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
        given_meta = [k for k in ("age", "sex", "skin_tone", "site") if k in fields]
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
        findings, measures = self.gate.check_images(images) if quality_gate else ([], {})
        timings["quality_ms"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        want_maps = explain and self.can_explain and not findings
        watch = self.gate.familiarity_modality if quality_gate and not findings else None
        probs, maps, methods, contrib, layer_stats = self.model_pass.run(images, metadata_used, want_maps, watch)
        criteria = self.model_pass.criteria(images, metadata_used)  # a multi-task model's 7-point criteria
        timings["inference_ms"] = (time.perf_counter() - t) * 1000
        unfamiliarity = self.gate.unfamiliarity(layer_stats) if watch else None
        probs = np.clip(probs, 0.0, 1.0)
        probs = probs / probs.sum() if probs.sum() > 0 else probs
        task = self.task
        findings += (self.gate.check_familiarity(unfamiliarity) + self.gate.check_model(probs)) if quality_gate else []
        decision = decide(task, probs, self.config.triage, self.config.uncertainty, missing_images, missing_meta)
        if findings:  # "cannot assess" overrules triage, and there is nothing to explain
            decision, want_maps, contrib = cannot_assess(decision, findings), False, {}

        t = time.perf_counter()
        heatmaps = []
        if want_maps:
            ec = self.config.explain
            for m in used:
                grid = maps.get(m)
                if grid is None:
                    continue
                crop = self.crop_pct.get(m, 1.0)
                ov, _ = overlay_heatmap(images[m], grid, max_side=ec.max_side, alpha=ec.alpha, cmap=ec.colormap,
                                        crop_pct=crop)
                w0, h0 = images[m].size
                heatmaps.append({"modality": m, "method": methods.get(m, ""), "overlay_png_base64": png_base64(ov),
                                 "width": ov.size[0], "height": ov.size[1], "original_width": w0,
                                 "original_height": h0,
                                 "model_region": list(center_crop_box(display_size((w0, h0), ec.max_side), crop))})
        timings["explain_render_ms"] = (time.perf_counter() - t) * 1000

        differential = sorted(
            ({"code": c, "name": class_name(task, c), "probability": float(p), "malignant": c in task.malignant}
             for c, p in zip(task.classes, probs)), key=lambda d: -d["probability"])
        fusion = None
        if contrib:
            c0 = contrib
            fusion = {"image": c0.get("image", {}), "none": c0.get("null", 0.0),
                      "concepts": [{k: d[k] for k in ("name", "label", "weight", "present")} for d in c0.get("concepts", [])],
                      "metadata": [{k: d[k] for k in ("name", "label", "weight", "present")} for d in c0.get("metadata", [])]}
        if explain and not self.can_explain:
            warnings.append("explanations are not available for this bundle kind" if self.explainer is None
                            else "explanations are switched off in the service config")
        now = datetime.now(timezone.utc)
        timings["analysis_ms"] = (time.perf_counter() - t_start) * 1000
        response = {
            "request_id": request_id, "created_at": now, "model": self.model_ref,
            "differential": differential, "primary_diagnosis": differential[0],
            "risk_score": round(decision.risk_score, 2), "risk_classes": sorted(task.malignant),
            "action": decision.action, "action_reasons": decision.action_reasons,
            "review_recommended": decision.review_recommended, "review_reasons": decision.review_reasons,
            "uncertainty": {"normalized_entropy": decision.normalized_entropy, "top_probability": decision.top_probability,
                            "margin": decision.margin},
            "quality": {"assessable": not findings, "reasons": [{"code": c, "message": m} for c, m in findings],
                        "measures": measures, "min_top_probability": self.gate.min_top_probability,
                        "unfamiliarity": unfamiliarity, "max_unfamiliarity": self.gate.max_unfamiliarity},
            "inputs": {"modalities_received": received, "modalities_used": used, "modalities_missing": missing_images,
                       "metadata_used": public_metadata(metadata_used), "metadata_missing": missing_meta,
                       "image_sha256": {m: uploads[m].sha256 for m in received},
                       "image_size": {m: list(images[m].size) for m in used},
                       "concepts_supplied": concepts_supplied, "concepts_computed": concepts_computed},
            "warnings": warnings,
            "explanations": {"heatmaps": heatmaps, "fusion": fusion},
            "criteria": None if findings else criteria,
            "calibrated": self.calibrated,
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
            "disclaimer": self.config.disclaimer,
        }
        audit = {
            "request_id": request_id, "created_at": now, "model_name": self.bundle.name,
            "model_version": self.model_ref["version"], "model_hash": self.bundle.content_hash, "task": task.name,
            "model_members": self.model_pass.members,  # every fold / member bundle, not only the first
            "input_hashes": {m: uploads[m].sha256 for m in received}, "input_stats": stats,
            "patient_metadata": metadata.model_dump(exclude_none=True),
            "outputs": {c: float(p) for c, p in zip(task.classes, probs)},
            "primary_class": differential[0]["code"], "top_probability": decision.top_probability,
            "risk_score": decision.risk_score, "action": decision.action,
            "review_recommended": decision.review_recommended, "review_reasons": decision.review_reasons,
            "warnings": warnings, "client": client,
            # which concept scores were supplied, which computed (values, scorer, mapping): None if the model uses none
            "concepts": concept_fill.audit() if self.concepts else None,
        }
        obs = observation(stats, probs, task.classes)
        raw = {m: (uploads[m].data, formats[m]) for m in used} if self.config.audit.store_images else {}
        return Analysis(response, audit, obs, raw)

    # ------------------------------------------------------------------------------------- warm-up
    def choose_backends(self) -> list[str]:
        """Each network's inference backend (``config.backend``; see ``ModelPass.choose_backends``)."""
        self.backends = self.model_pass.choose_backends(self.config.backend, self.gate.familiarity_modality)
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


def familiarity_reference(predictor) -> dict | None:
    """The familiarity reference of the network whose layers the service watches (the first one, as in
    ``ModelPass.run``): a fold ensemble is checked against its first fold's validation lesions."""
    mix = predictor.mixture() if hasattr(predictor, "mixture") else []
    first = mix[0][1] if mix else predictor
    return read_reference(getattr(getattr(first, "bundle", None), "path", None))
