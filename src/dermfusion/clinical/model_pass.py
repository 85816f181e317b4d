"""The model pass: in-memory lesions in, the served predictor's **raw** combined probabilities out (plus what the
gate and the explanation need).

When the predictor is a weighted mean of networks (one network, a run's fold ensemble, an ``average`` or
``ensemble`` bundle — ``Predictor.mixture``), each network runs here on the lesions' decoded images
(``data.dataset.batch_from_lesions``: the one evaluation transform), on its chosen backend, averaged over the test-time
views the bundle was validated with; the raw probabilities are combined with the predictor's own weights — the
ensemble rule of ``inference.predictor``. Any other predictor (a tabular expert, a stack) gets in-memory manifest rows
(``clinical.lesion.frame_from_lesions``: the images themselves in the image columns, no temporary files) and its own
``predict_raw``. Calibration and decisions come after, in ``clinical.decisions``.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.dataset import batch_from_lesions
from ..data.importers.isic import import_isic
from ..data.transforms import tta_views
from ..explain import Explainer
from ..inference.backend_policy import EXACT, criteria_approved, policy_text, read_record
from ..inference.backends import selection_text
from ..inference.criteria import criteria_probabilities, divide_label_prior
from ..inference.network import NetworkPredictor
from ..inference.predictor import Predictor
from ..models.layer_stats import LayerStats
from ..runtime.device import move_batch
from ..tasks import MODALITIES
from .lesion import Lesion, frame_from_lesions

log = logging.getLogger("dermfusion.clinical")


@dataclass
class PassResult:
    raw: np.ndarray                                   # N×C combined raw probabilities
    maps: list[dict] = field(default_factory=list)    # per lesion {modality: grid} (explained lesions only)
    methods: dict = field(default_factory=dict)       # modality -> explanation method
    contributions: list[dict] = field(default_factory=list)  # per lesion: fusion attention shares
    layer_stats: np.ndarray | None = None             # N×S of the watched image (familiarity check), or None
    criteria: dict | None = None                      # {criterion: N×L probabilities} (multi-task networks), or None


def network_tta(leaf) -> int:
    """The test-time views one network was validated with (``train.tta`` of its experiment config; 0 without)."""
    cfg = getattr(leaf, "bundle", None)
    exp = (cfg.config.get("experiment") or {}) if cfg is not None else {}
    return int(((exp.get("train") or {}).get("tta")) or 0)


def bundle_tta(predictor) -> int:
    """The test-time views the bundle's first network was validated with (what `predict` reports; each network of a
    blend runs with its own, ``ModelPass.run(tta=None)``); 0 for predictors without networks."""
    mix = predictor.mixture() or []
    return network_tta(mix[0][1]) if mix else 0


def _union(lists) -> list:
    """The items of ``lists`` in first-seen order, each once."""
    return list(dict.fromkeys(x for items in lists for x in items))


class ModelPass:
    """The served predictor, seen as what it needs (image modalities, metadata fields, concept columns) and how it
    turns lesions into raw probabilities."""

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
        self._criteria_ok: dict = {}   # (network, backend) → may its criteria output be served
        primary = self.networks[0] if self.networks else None
        if primary is not None:  # what any network of a blend reads (each one takes its own share in run)
            self.modalities = _union(n.spec.modalities for n in self.networks)
            self.metadata_fields = _union([*n.spec.numeric, *n.spec.categorical] for n in self.networks)
            self.concepts = _union(n.spec.concepts for n in self.networks)
            self.views = [network_tta(n) for n in self.networks]
            self.explainer = Explainer.for_model(primary.model)
        else:
            self.modalities, self.metadata_fields, self.concepts = inputs_of(predictor)
            self.explainer = None

    def _criteria_trusted(self, net, backend: str | None) -> bool:
        """Whether ``backend``'s criteria output may be served for ``net`` (``backend_policy.criteria_approved``)."""
        key = (id(net), backend)
        if key not in self._criteria_ok:
            self._criteria_ok[key] = backend in EXACT or criteria_approved(read_record(net.bundle.path), backend)
        return self._criteria_ok[key]

    @property
    def criteria_heads(self):
        """The first served network's dermoscopic-criteria heads (their names and label sets), or None."""
        return next((net.model.criteria_heads for net in self.networks
                     if getattr(net.model, "criteria_heads", None) is not None), None)

    @property
    def is_network(self) -> bool:
        return bool(self.networks)

    def run(self, lesions: list[Lesion], *, tta: int | None = 0, want_maps: bool = False,
            stats_modality: str | None = None, want_criteria: bool = False) -> PassResult:
        """Raw combined probabilities of ``lesions`` (N×C), averaged over ``tta`` views (None: each network over the
        views it was validated with); heat maps of the first network when ``want_maps``; the first network's layer
        statistics of ``stats_modality``'s image (view 0); with ``want_criteria``, the dermoscopic criteria of the
        networks with criteria heads, from the same forward passes (``_mix_criteria``)."""
        if not lesions:
            return PassResult(np.zeros((0, self.predictor.task.num_classes)))
        if not self.networks:
            frame = frame_from_lesions(lesions, self.concepts)
            return PassResult(np.asarray(self.predictor.predict_raw(frame, tta=tta or 0), dtype=np.float64))
        # filled by the first network's first view (heat maps, attention shares, layer statistics), then the mixture
        out = PassResult(np.zeros(0), [{} for _ in lesions], {}, [{} for _ in lesions])
        raw, crit_per_net = [], []
        for i, net in enumerate(self.networks):
            n_views = max(1, int(self.views[i] if tta is None else tta))
            with_criteria = want_criteria and getattr(net.model, "criteria_heads", None) is not None
            watch = stats_modality if i == 0 and any(stats_modality in les.images for les in lesions) else None
            mean, crit = self._network_pass(net, lesions, n_views, watch=watch, explain=i == 0, want_maps=want_maps,
                                            with_criteria=with_criteria, out=out)
            raw.append(mean)
            if with_criteria:
                crit_per_net.append((float(self.weights[i]), net, crit))
        out.raw = np.tensordot(self.weights, np.stack(raw), axes=1)  # the predictor's own combination of raw output
        out.criteria = _mix_criteria(crit_per_net)
        return out

    def _network_pass(self, net, lesions: list[Lesion], n_views: int, *, watch: str | None, explain: bool,
                      want_maps: bool, with_criteria: bool, out: PassResult) -> tuple[np.ndarray, dict]:
        """One network over ``lesions``, on its chosen backend: the mean of its raw probabilities over ``n_views``
        test-time views (N×C) and, ``with_criteria``, of its criteria probabilities ({criterion: N×L})."""
        batch = batch_from_lesions([{m: img for m, img in les.images.items() if m in net.spec.modalities}
                                    for les in lesions], [les.metadata for les in lesions], net.spec,
                                   net.preprocess, [les.lesion_id for les in lesions])
        batch = move_batch(batch, net.device)
        fast = getattr(net, "runner", None)
        fast = fast if fast is not None and fast is not net.model else None
        views = {m: tta_views(m, n_views) for m in net.spec.modalities}
        acc, crit_acc = None, {}
        for v in range(n_views):
            b = dict(batch, images={m: views[m][v](x) for m, x in batch["images"].items()}) if n_views > 1 else batch
            p, crit = self._view_pass(net, fast, b, watch=watch if v == 0 else None, explain=explain and v == 0,
                                      want_maps=want_maps, out=out)
            acc = np.asarray(p, dtype=np.float64) if acc is None else acc + p
            if with_criteria:
                if crit is None:  # a backend that exports the diagnosis only: the eager heads on this view
                    with torch.no_grad():
                        crit = net.model(b)["criteria"]
                for name, q in criteria_probabilities(crit).items():
                    crit_acc[name] = crit_acc.get(name, 0) + q / n_views
        return acc / n_views, crit_acc

    def _view_pass(self, net, fast, b: dict, *, watch: str | None, explain: bool, want_maps: bool,
                   out: PassResult) -> tuple[np.ndarray, dict | None]:
        """One view through one network: (N×C probabilities, its criteria logits or None). The fast backend runs
        when there is one, the eager model when there is none or when this view is ``explain``ed; ``watch``: the
        modality whose layer statistics go into ``out``, from whichever pass runs."""
        probe = LayerStats(fast.module if fast is not None else net.model, watch) \
            if watch and (fast is None or fast.module is not None) else None
        p, crit = None, None
        if fast is not None:
            p, res = _forward(fast, b, probe)
            # criteria from an exact backend, or an approximate one whose agreement record measured the criteria heads
            # too (else those run eager, in _network_pass)
            crit = res.get("criteria") if self._criteria_trusted(net, getattr(fast, "name", None)) else None
            if watch and res.get("layer_stats") is not None:
                out.layer_stats = np.asarray(res["layer_stats"], dtype=np.float64)
        if explain and (want_maps or fast is None) and self.explainer is not None:
            res = self._explain(b, probe if fast is None else None, want_maps, out)
            if p is None:
                p, crit = res.probs, res.criteria
        elif p is None:
            p, res = _forward(net.model, b, probe)
            crit = res.get("criteria")
        if probe is not None and out.layer_stats is None:
            taken = probe.take()
            out.layer_stats = None if taken is None else taken.cpu().numpy().astype(np.float64)
        return p, crit

    def _explain(self, b: dict, probe, want_maps: bool, out: PassResult):
        """The eager model explains (maps need gradients / hooks) — on the untransformed view: its heat maps (with
        ``want_maps``) and fusion attention shares go into ``out``; returns the explainer's result."""
        with probe if probe is not None else nullcontext():
            res = self.explainer.run(b, explain=want_maps)
        if want_maps:
            out.maps = [{m: rows[k] for m, rows in res.maps.items() if rows and rows[k] is not None}
                        for k in range(len(out.maps))]
            out.methods = res.methods
        if res.contributions:
            out.contributions = list(res.contributions)
        return res

    def choose_backends(self, name: str, stats_modality: str | None = None, sample: pd.DataFrame | None = None,
                        threads: int | None = None) -> list[str]:
        """Each network's inference backend under the one policy (``inference.backend_policy``): ``auto`` = the
        fastest of the exact backends and the approximate ones the bundle's agreement record approves for this CPU,
        checked against fp32 eager on ``sample`` (default: the bundled real HAM10000 images); ``trained`` = as
        validated in training; any other name is used as given. ``stats_modality``: the first network's backend
        also gives that image's layer statistics (the gate's familiarity check)."""
        chosen, self.backend_warnings, self.backend_failures = [], [], []
        self._criteria_ok = {}  # a new choice reads the agreement records afresh
        for i, net in enumerate(self.networks):
            frame = sample if sample is not None else sample_frame(net.spec)
            failed = []
            options = {"layer_stats": stats_modality} if i == 0 and stats_modality else {}
            # ONNX Runtime sessions get every core: one session serves all workers (its runs share the pool)
            options["threads"] = threads or available_cores()
            if name == "auto":
                net.choose_backend(frame, options=options)
                log.info("backend check (%s): %s", policy_text(net), selection_text(net.selection, net.backend))
                failed = [rec for rec in net.selection or [] if rec.get("error")]  # faults, not accuracy refusals
            elif name == "trained":  # as the out-of-fold predictions were made (training.out_of_fold): float32
                net.use_backend("fp32", frame, options)
            else:
                net.use_backend(name, frame, options)
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


def _forward(model, b: dict, probe=None) -> tuple[np.ndarray, dict]:
    """A model or backend runner on one batch, no gradients, ``probe`` (``LayerStats``) watching: (N×C float32
    probabilities, the raw output)."""
    with torch.no_grad(), probe if probe is not None else nullcontext():
        res = model(b)
    return torch.softmax(res["logits"].float(), -1).cpu().numpy(), res


def _mix_criteria(per_net: list[tuple[float, object, dict]]) -> dict | None:
    """The criteria of the networks that predict them, as ``inference.criteria`` defines them: each network's view
    mean divided by the label prior its heads trained under, then the networks' weighted mean (weights renormalised
    over these networks). None when no network predicts criteria."""
    if not per_net:
        return None
    names = [c.name for c in per_net[0][1].model.criteria_heads.criteria]
    total, out = sum(w for w, _, _ in per_net), {}
    for w, net, acc in per_net:
        if [c.name for c in net.model.criteria_heads.criteria] != names:
            raise ValueError("the ensemble's networks predict different criteria sets")
        for name, p in divide_label_prior(acc, net.bundle.config.get("criteria_prior")).items():
            out[name] = out.get(name, 0) + (w / total if total > 0 else 1 / len(per_net)) * p
    return {name: out[name] for name in names}


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
