"""One analysis, end to end and independent of HTTP: uploaded bytes + metadata -> the response payload,
the audit record and the drift observation. Used by the API (in worker threads) and by
``dermfusion explain``.

Steps: decode (safely) → check which inputs the model uses → one explained forward pass →
calibrate with the bundle's calibration → triage → heat-map overlays at the original aspect ratio.
"""
from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import __version__
from ..data.images import ImageError, decode_image
from ..inference.bundle import Predictor
from ..tasks import MODALITIES
from .config import ServiceConfig
from .drift import image_stats, observation
from .schemas import PatientMetadata
from .triage import decide

log = logging.getLogger("dermfusion.service")


class InputError(Exception):
    """A problem with what the client sent: becomes a 4xx JSON error, never a 500."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, details=None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.details = status, code, message, field, details


@dataclass
class Upload:
    modality: str
    data: bytes
    content_type: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Analysis:
    response: dict
    audit: dict
    observation: dict
    images: dict = field(default_factory=dict)   # modality -> (bytes, format) for optional storage


def calibrate(calibration: dict, probs: np.ndarray) -> tuple[np.ndarray, bool]:
    """Apply the bundle's calibration (``evaluation.calibration.Calibration``) to N×C probabilities.

    Identity, reported as not calibrated, when the bundle has no calibration or the calibration
    module is not installed.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if not calibration:
        return probs, False
    try:
        from ..evaluation.calibration import Calibration
    except ImportError:
        return probs, False
    out = np.asarray(Calibration.from_dict(calibration).apply(probs), dtype=np.float64)
    return out, True


def class_name(task, c: str) -> str:
    return task.class_descriptions.get(c) or _DEFAULT_NAMES.get(c, c)


_DEFAULT_NAMES = {
    "MEL": "melanoma", "NV": "melanocytic nevus", "BCC": "basal cell carcinoma",
    "AKIEC": "actinic keratosis / intraepidermal carcinoma", "AK": "actinic keratosis",
    "BKL": "benign keratosis", "DF": "dermatofibroma", "VASC": "vascular lesion", "SCC": "squamous cell carcinoma",
    "NEV": "nevus", "SK": "seborrhoeic keratosis", "MISC": "other", "ACK": "actinic keratosis",
    "SEK": "seborrhoeic keratosis",
}


class Analyzer:
    def __init__(self, predictor: Predictor, config: ServiceConfig | None = None):
        from ..explain import Explainer

        self.config = config or ServiceConfig()
        self.predictor = predictor
        self.bundle = predictor.bundle
        self.task = predictor.task
        members = list(getattr(predictor, "members", None) or [predictor])
        self.networks = [p for p in members if hasattr(p, "model") and hasattr(p, "spec") and hasattr(p, "preprocess")]
        self.is_network = len(self.networks) == len(members) and bool(self.networks)
        primary = self.networks[0] if self.is_network else None
        if primary is not None:
            self.spec = primary.spec
            self.modalities = list(primary.spec.modalities)
            self.metadata_fields = list(primary.spec.numeric) + list(primary.spec.categorical)
            self.concepts = list(primary.spec.concepts)
            self.explainer = Explainer.for_model(primary.model)
        else:
            self.spec = None
            self.modalities, self.metadata_fields, self.concepts = _inputs_of(predictor)
            self.explainer = None
        self.calibration = dict(self.bundle.calibration or {})
        self.calibrated = calibrate(self.calibration, np.full((1, self.task.num_classes), 1.0 / self.task.num_classes))[1]
        self.ready = False
        self.backends: list[str] = []

    # --------------------------------------------------------------------------------------- info
    @property
    def model_ref(self) -> dict:
        b = self.bundle
        return {"name": b.name, "version": b.version or f"dermfusion {__version__}", "hash": b.content_hash,
                "task": self.task.name, "kind": b.kind}

    @property
    def can_explain(self) -> bool:
        return self.explainer is not None and self.config.explain.enabled

    # ------------------------------------------------------------------------------------ decoding
    def decode(self, up: Upload) -> tuple[Image.Image, str]:
        """(RGB image, format) or InputError with the reason."""
        name = f"{up.modality} image"
        lim = self.config.limits
        if not up.data:
            raise InputError(400, "empty_image", f"{name}: the uploaded file is empty", up.modality)
        try:
            with Image.open(io.BytesIO(up.data)) as probe:
                fmt, (w, h) = probe.format or "", probe.size
        except Image.DecompressionBombError:
            raise InputError(413, "decompression_bomb", f"{name}: refused as a decompression bomb (too many pixels)",
                             up.modality) from None
        except UnidentifiedImageError:
            raise InputError(400, "not_an_image", f"{name}: not an image (format not recognised); "
                             "upload a JPEG or PNG photo", up.modality) from None
        except Exception:  # noqa: BLE001 — any parser failure is the file's fault
            raise InputError(400, "invalid_image", f"{name}: corrupt or unreadable image", up.modality) from None
        if w * h > lim.max_pixels:
            raise InputError(413, "decompression_bomb" if len(up.data) < w * h // 100 else "too_many_pixels",
                             f"{name}: {w}×{h} = {w * h:,} pixels exceeds the limit of {lim.max_pixels:,} "
                             "(possible decompression bomb); downscale the image", up.modality)
        if min(w, h) < lim.min_side:
            raise InputError(422, "image_too_small", f"{name}: {w}×{h} is too small (min {lim.min_side} px per side)",
                             up.modality)
        try:
            img = decode_image(up.data, name, lim.max_pixels)
        except ImageError as e:
            msg = str(e)
            if "truncated" in msg:
                raise InputError(400, "truncated_image", f"{name}: the file is truncated (incomplete upload?)",
                                 up.modality) from None
            if "bomb" in msg or "exceeds" in msg:
                raise InputError(413, "decompression_bomb", msg, up.modality) from None
            raise InputError(400, "invalid_image", msg, up.modality) from None
        return img, fmt

    # ------------------------------------------------------------------------------------ analysis
    def analyze(self, uploads: dict[str, Upload], metadata: PatientMetadata | None = None, *,
                request_id: str = "local", explain: bool = True, client: str | None = None) -> Analysis:
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
            images[m], formats[m] = self.decode(uploads[m])
            stats[m] = image_stats(images[m])
        for m in unused:  # still validate what was sent: a broken file is an error either way
            img, _ = self.decode(uploads[m])
            if not self.modalities:
                stats[m] = image_stats(img)
        timings["decode_ms"] = (time.perf_counter() - t) * 1000

        fields = metadata.manifest_fields()
        model_fields = set(self.metadata_fields)
        metadata_used = {k: v for k, v in fields.items() if k in model_fields or k in self.concepts}
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
        want_maps = explain and self.can_explain
        probs, maps, methods, contrib = self._predict(images, metadata_used, want_maps)
        timings["inference_ms"] = (time.perf_counter() - t) * 1000
        probs = np.clip(probs, 0.0, 1.0)
        probs = probs / probs.sum() if probs.sum() > 0 else probs
        task = self.task
        decision = decide(task, probs, self.config.triage, self.config.uncertainty, missing_images, missing_meta)

        t = time.perf_counter()
        heatmaps = []
        if want_maps:
            from ..explain import center_crop_box, overlay_heatmap, png_base64
            from ..explain.overlay import display_size

            ec = self.config.explain
            for m in used:
                grid = maps.get(m)
                if grid is None:
                    continue
                ov, _ = overlay_heatmap(images[m], grid, max_side=ec.max_side, alpha=ec.alpha, cmap=ec.colormap)
                w0, h0 = images[m].size
                heatmaps.append({"modality": m, "method": methods.get(m, ""), "overlay_png_base64": png_base64(ov),
                                 "width": ov.size[0], "height": ov.size[1], "original_width": w0,
                                 "original_height": h0,
                                 "model_region": list(center_crop_box(display_size((w0, h0), ec.max_side)))})
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
            "inputs": {"modalities_received": received, "modalities_used": used, "modalities_missing": missing_images,
                       "metadata_used": _public_metadata(metadata_used), "metadata_missing": missing_meta,
                       "image_sha256": {m: uploads[m].sha256 for m in received},
                       "image_size": {m: list(images[m].size) for m in used}},
            "warnings": warnings,
            "explanations": {"heatmaps": heatmaps, "fusion": fusion},
            "calibrated": self.calibrated,
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
            "disclaimer": self.config.disclaimer,
        }
        audit = {
            "request_id": request_id, "created_at": now, "model_name": self.bundle.name,
            "model_version": self.model_ref["version"], "model_hash": self.bundle.content_hash, "task": task.name,
            "input_hashes": {m: uploads[m].sha256 for m in received}, "input_stats": stats,
            "patient_metadata": metadata.model_dump(exclude_none=True),
            "outputs": {c: float(p) for c, p in zip(task.classes, probs)},
            "primary_class": differential[0]["code"], "top_probability": decision.top_probability,
            "risk_score": decision.risk_score, "action": decision.action,
            "review_recommended": decision.review_recommended, "review_reasons": decision.review_reasons,
            "warnings": warnings, "client": client,
        }
        obs = observation(stats, probs, task.classes)
        raw = {m: (uploads[m].data, formats[m]) for m in used} if self.config.audit.store_images else {}
        return Analysis(response, audit, obs, raw)

    def _predict(self, images: dict, metadata: dict, want_maps: bool):
        """(calibrated probs C, maps {mod: grid}, methods, fusion contributions of row 0)."""
        if not self.is_network:
            return self._predict_generic(images, metadata), {}, {}, {}
        import torch

        from ..data.dataset import batch_from_inputs
        from ..training.runtime import move_batch

        all_probs, maps, methods, contrib = [], {}, {}, {}
        for i, net in enumerate(self.networks):
            batch = batch_from_inputs({m: img for m, img in images.items() if m in net.spec.modalities},
                                      metadata, net.spec, net.preprocess)
            batch = move_batch(batch, net.device)
            fast = getattr(net, "runner", None)
            fast = fast if fast is not None and fast is not net.model else None
            p = None
            if fast is not None:  # the selected backend gives the probabilities, explained or not
                with torch.no_grad():
                    p = torch.softmax(fast(batch)["logits"].float(), -1)[0].cpu().numpy()
            if i == 0 and (want_maps or fast is None):  # the eager model explains (maps need gradients / hooks)
                res = self.explainer.run(batch, explain=want_maps)
                p = res.probs[0] if p is None else p
                maps = {m: rows[0] for m, rows in res.maps.items() if rows and rows[0] is not None}
                methods = res.methods
                contrib = res.contributions[0] if res.contributions else {}
            elif p is None:
                with torch.no_grad():
                    p = torch.softmax(net.model(batch)["logits"].float(), -1)[0].cpu().numpy()
            # like AveragePredictor: each member calibrated with its own bundle's calibration, then averaged
            p = calibrate(net.bundle.calibration, np.asarray(p)[None])[0][0]
            all_probs.append(np.asarray(p, dtype=np.float64))
        return np.mean(all_probs, axis=0), maps, methods, contrib

    def _predict_generic(self, images: dict, metadata: dict) -> np.ndarray:
        """Any other bundle kind: a one-row manifest with the images in a temporary folder."""
        import pandas as pd

        with tempfile.TemporaryDirectory(prefix="dermfusion-req-") as d:
            row = {"lesion_id": "request", "dataset": "api", "patient_id": "", "split": "", "fold": -1,
                   "image_clinical": "", "image_dermoscopic": "", "age": float("nan"), "sex": "", "skin_tone": "",
                   "site": ""}
            for m, img in images.items():
                p = Path(d) / f"{m}.png"
                img.save(p)
                row[f"image_{m}"] = str(p)
            row.update(metadata)
            df = pd.DataFrame([row])
            for c in self.concepts:
                if c not in df.columns:
                    df[c] = float("nan")
            try:
                probs = self.predictor.predict_proba(df)
            except ImportError:  # calibration module not installed: uncalibrated
                probs = self.predictor.predict_raw(df)
        return np.asarray(probs, dtype=np.float64)[0]

    # ------------------------------------------------------------------------------------- warm-up
    def choose_backends(self) -> list[str]:
        """Each network's inference backend (``config.backend``): ``auto`` = the fastest whose probabilities on
        the bundled real HAM10000 sample match fp32 eager (max |Δp| ≤ 0.02, argmax agreement ≥ 99 %), else fp32."""
        name = self.config.backend
        chosen = []
        for net in self.networks:
            if not hasattr(net, "choose_backend"):
                chosen.append("fp32")
                continue
            sample = sample_frame(net.spec)
            if name == "auto":
                net.choose_backend(sample)
                from ..inference.backends import selection_text

                log.info("backend check: %s", selection_text(net.selection, net.backend))
            elif name != "trained":
                net.use_backend(name, sample)
            chosen.append(net.backend)
        self.backends = chosen
        if chosen:
            log.info("inference backend: %s", ", ".join(sorted(set(chosen))))
        return chosen

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
        self.analyze(uploads, PatientMetadata(), request_id="warmup", explain=True)
        self.ready = True
        return time.perf_counter() - t


def sample_frame(spec, n: int = 32):
    """A manifest of the bundled real HAM10000 sample images for backend checks (every image modality the
    model uses gets the dermoscopic photo; metadata as recorded)."""
    from importlib import resources

    from ..data.importers.isic import import_isic

    root = Path(str(resources.files("dermfusion") / "fixtures" / "ham10000_sample"))
    df = import_isic(root / "train.csv", dataset="ham10000").head(n).reset_index(drop=True)
    for m in spec.modalities:
        df[f"image_{m}"] = df["image_dermoscopic"]
    for c in spec.concepts:
        if c not in df.columns:
            df[c] = float("nan")
    return df


def _inputs_of(predictor) -> tuple[list[str], list[str], list[str]]:
    """(image modalities, metadata fields, concept columns) any part of a predictor uses — walks the
    members of ensembles / stacks; network members have a FeatureSpec, tabular ones a TabularFeatureSpec."""
    mods, meta, concepts, known = set(), [], [], []

    def add(items, into):
        for x in items:
            if x not in into:
                into.append(x)

    def walk(p):
        spec = getattr(p, "spec", None)
        if hasattr(p, "model") and spec is not None and hasattr(spec, "numeric"):
            known.append(p)
            mods.update(spec.modalities)
            add(list(spec.numeric) + list(spec.categorical), meta)
            add(spec.concepts, concepts)
        elif spec is not None and hasattr(spec, "use_metadata"):  # tabular: concepts + metadata, no images
            known.append(p)
            add([f"concept_{m}_{c}" for m in spec.modalities for c in spec.concepts], concepts)
            if spec.use_metadata:
                add(["age", *spec.categorical], meta)
        for m in getattr(p, "members", None) or []:
            walk(m)

    walk(predictor)
    if not known:  # a kind we cannot introspect: offer it the task's images and the usual metadata
        return list(predictor.task.modalities), ["age", "sex", "skin_tone", "site"], []
    return [m for m in MODALITIES if m in mods], meta, concepts


def _public_metadata(fields: dict) -> dict:
    out = {}
    for k, v in fields.items():
        if k.startswith("concept_"):
            out.setdefault("concepts", {})[k.removeprefix("concept_")] = v
        else:
            out[k] = v
    return out
