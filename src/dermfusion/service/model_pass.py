"""The model pass of one analysis: which inputs the served predictor uses, and its calibrated probabilities.

When the predictor is a weighted mean of networks (one network, a run's fold ensemble, an ``average`` or
``ensemble`` bundle — ``Predictor.mixture``), each network runs here on the request's images: the first one
explained (heat maps need the eager model), each on its chosen backend. Their *raw* probabilities are combined
with the predictor's own weights and the predictor's one calibration is applied — the ensemble rule of
``inference.predictor``, so the service answers what ``dermfusion predict`` writes for the same lesion. Any other
predictor (tabular, stacks) gets a one-row manifest and its own ``predict_proba``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..criteria import seven_point_score
from ..data.dataset import batch_from_inputs
from ..data.importers.isic import import_isic
from ..explain import Explainer
from ..inference.backends import selection_text
from ..inference.criteria import divide_label_prior
from ..inference.network import NetworkPredictor
from ..inference.predictor import Predictor
from ..models.layer_stats import LayerStats
from ..runtime.device import move_batch
from ..tasks import MODALITIES

log = logging.getLogger("dermfusion.service")


class ModelPass:
    """The served predictor, seen as what it needs (image modalities, metadata fields, concept columns) and how it
    turns one lesion into calibrated probabilities."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        mix = predictor.mixture()
        if mix and all(isinstance(leaf, NetworkPredictor) for _, leaf in mix):
            self.networks = [leaf for _, leaf in mix]
            self.weights = np.array([w for w, _ in mix], dtype=np.float64)
        else:
            self.networks, self.weights = [], np.zeros(0)
        self.members = members_of(predictor)
        self.backend_warnings: list[str] = []
        self.backend_failures: list[int] = []
        primary = self.networks[0] if self.networks else None
        if primary is not None:
            self.modalities = list(primary.spec.modalities)
            self.metadata_fields = list(primary.spec.numeric) + list(primary.spec.categorical)
            self.concepts = list(primary.spec.concepts)
            self.explainer = Explainer.for_model(primary.model)
        else:
            self.modalities, self.metadata_fields, self.concepts = inputs_of(predictor)
            self.explainer = None

    @property
    def is_network(self) -> bool:
        return bool(self.networks)

    def run(self, images: dict, metadata: dict, want_maps: bool, stats_modality: str | None = None):
        """(calibrated probabilities C, heat maps {modality: grid}, methods, fusion contributions of the lesion,
        the first network's layer statistics of ``stats_modality``'s image — 1×S, or None — for the gate's
        familiarity check)."""
        if not self.networks:
            return self._predict_generic(images, metadata), {}, {}, {}, None
        raw, maps, methods, contrib, stats = [], {}, {}, {}, None
        for i, net in enumerate(self.networks):
            batch = batch_from_inputs({m: img for m, img in images.items() if m in net.spec.modalities},
                                      metadata, net.spec, net.preprocess)
            batch = move_batch(batch, net.device)
            fast = getattr(net, "runner", None)
            fast = fast if fast is not None and fast is not net.model else None
            watch = stats_modality if i == 0 and stats_modality in images else None
            # the layer statistics come from whichever pass runs first: the fast backend's, else the eager model's
            probe = LayerStats(fast.module if fast is not None else net.model, watch) \
                if watch and (fast is None or fast.module is not None) else None
            p = None
            if fast is not None:  # the selected backend gives the probabilities, explained or not
                with torch.no_grad(), probe if probe is not None else nullcontext():
                    out = fast(batch)
                p = torch.softmax(out["logits"].float(), -1)[0].cpu().numpy()
                if watch and out.get("layer_stats") is not None:
                    stats = np.asarray(out["layer_stats"], dtype=np.float64)
            if i == 0 and (want_maps or fast is None):  # the eager model explains (maps need gradients / hooks)
                with probe if probe is not None and fast is None else nullcontext():
                    res = self.explainer.run(batch, explain=want_maps)
                p = res.probs[0] if p is None else p
                maps = {m: rows[0] for m, rows in res.maps.items() if rows and rows[0] is not None}
                methods = res.methods
                contrib = res.contributions[0] if res.contributions else {}
            elif p is None:
                with torch.no_grad():
                    p = torch.softmax(net.model(batch)["logits"].float(), -1)[0].cpu().numpy()
            if probe is not None and stats is None:
                taken = probe.take()
                stats = None if taken is None else taken.cpu().numpy().astype(np.float64)
            raw.append(np.asarray(p, dtype=np.float64))
        mixed = np.tensordot(self.weights, np.stack(raw), axes=1)  # the predictor's own combination of raw output
        return self.predictor.calibration.apply(mixed[None])[0], maps, methods, contrib, stats

    def criteria(self, images: dict, metadata: dict) -> dict | None:
        """A multi-task network's dermoscopic criteria for the lesion (the first network with criteria heads, an
        eager pass: the fast backends export the diagnosis only) — labels, probabilities and the 7-point score;
        None when no network predicts criteria."""
        net = next((n for n in self.networks if getattr(n.model, "criteria_heads", None) is not None), None)
        if net is None:
            return None
        batch = move_batch(batch_from_inputs({m: img for m, img in images.items() if m in net.spec.modalities},
                                             metadata, net.spec, net.preprocess), net.device)
        with torch.no_grad():
            logits = net.model(batch)["criteria"]
        heads = net.model.criteria_heads
        probs = divide_label_prior({c.name: torch.softmax(logits[c.name].float(), -1).cpu().numpy()
                                    for c in heads.criteria}, net.bundle.config.get("criteria_prior"))
        items, labels = [], {}
        for c in heads.criteria:
            p = probs[c.name][0]
            labels[c.name] = c.labels[int(p.argmax())]
            items.append({"criterion": c.name, "label": labels[c.name],
                          "probabilities": {label: float(v) for label, v in zip(c.labels, p)}})
        return {"set": heads.criteria_set, "items": items, "seven_point_score": seven_point_score(labels, heads.criteria)}

    def _predict_generic(self, images: dict, metadata: dict) -> np.ndarray:
        """Any other predictor: a one-row manifest with the images in a temporary folder."""
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
            probs = self.predictor.predict_proba(df)
        return np.asarray(probs, dtype=np.float64)[0]

    def choose_backends(self, name: str, stats_modality: str | None = None) -> list[str]:
        """Each network's inference backend: ``auto`` = the fastest whose probabilities on the bundled real
        HAM10000 sample match fp32 eager (max |Δp| ≤ 0.02, argmax agreement ≥ 99 %), else fp32; ``trained`` = as
        validated in training; any other name is used as given. ``stats_modality``: the first network's backend
        also gives that image's layer statistics (the quality gate's familiarity check)."""
        chosen, self.backend_warnings, self.backend_failures = [], [], []
        for i, net in enumerate(self.networks):
            sample = sample_frame(net.spec)
            failed = []
            options = {"layer_stats": stats_modality} if i == 0 and stats_modality else {}
            # ONNX Runtime sessions get every core: one session serves all workers (its runs share the pool), and
            # with `workers.torch_threads: 1` a one-thread session would double a lone request's latency
            options["threads"] = available_cores()
            if name == "auto":
                net.choose_backend(sample, options=options)
                log.info("backend check: %s", selection_text(net.selection, net.backend))
                failed = [rec for rec in net.selection or [] if rec.get("error")]  # faults, not accuracy refusals
            elif name != "trained":
                net.use_backend(name, sample, options)
            for rec in failed:  # never silent: logged, in /readyz and in dermfusion_backend_failures
                reason = (str(rec.get("reason", "")).splitlines() or ["failed"])[0][:200]
                msg = f"member {i} ({net.bundle.name}): backend {rec['name']} failed ({reason}); using {net.backend}"
                log.warning("backend fallback: %s", msg)
                self.backend_warnings.append(msg)
            self.backend_failures.append(len(failed))
            chosen.append(net.backend)
        if chosen:
            log.info("inference backend: %s", ", ".join(sorted(set(chosen))))
        return chosen


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def sample_frame(spec, n: int = 32) -> pd.DataFrame:
    """A manifest of the bundled real HAM10000 sample images for backend checks (every image modality the
    model uses gets the dermoscopic photo; metadata as recorded)."""
    root = Path(str(resources.files("dermfusion") / "fixtures" / "ham10000_sample"))
    df = import_isic(root / "train.csv", dataset="ham10000").head(n).reset_index(drop=True)
    for m in spec.modalities:
        df[f"image_{m}"] = df["image_dermoscopic"]
    for c in spec.concepts:
        if c not in df.columns:
            df[c] = float("nan")
    return df


def members_of(predictor) -> list[dict]:
    """Every bundle whose output goes into the answer — each fold of a run, each member of an ensemble or stack,
    or the one bundle — as ``{"name", "version", "hash"}``, in the predictor's order (recorded in every audit row)."""
    out: list[dict] = []

    def walk(p):
        members = getattr(p, "members", None)
        if members:
            for m in members:
                walk(m)
            return
        b = getattr(p, "bundle", None)
        if b is not None:
            out.append({"name": b.name, "version": b.version, "hash": b.content_hash})

    walk(predictor)
    return out


def inputs_of(predictor) -> tuple[list[str], list[str], list[str]]:
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
