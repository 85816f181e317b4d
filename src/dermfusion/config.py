"""Experiment configuration: YAML validated into typed objects (pydantic), with `--set key=value` overrides."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import DermfusionError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(DermfusionError, ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    cache_dir: Optional[str] = "~/.cache/dermfusion/decode"
    num_workers: int = -1          # -1: sized to the machine
    aug_strength: float = 1.0
    color_constancy: Literal["none", "shades_of_gray"] = "none"   # at training and prediction (in the bundle)
    use_metadata: bool = True
    # the metadata a network reads, in token order (data/features.py: age, sex, skin_tone, site, elevation; never
    # a label leak such as Derm7pt's management); null = age, sex, skin_tone, site
    metadata_fields: Optional[list[str]] = None
    use_concepts: bool = True
    modalities: Optional[list[str]] = None   # default: the task's modalities present in the manifest


class LossConfig(_Strict):
    name: str = "focal+soft_f1"    # ce | focal | focal+soft_f1 | ce+soft_f1
    gamma: float = 2.0
    alpha: Optional[str] = "inverse_frequency"   # inverse_frequency | none
    soft_f1_weight: float = 0.5
    label_smoothing: float = 0.0
    aux_weight: float = 0.3
    # one class against the rest as an extra binary term (e.g. melanoma vs everything else, the triage question):
    # binary cross-entropy on log P(class) − log P(rest) of the same logits, weighted by vs_rest_weight (0 = off).
    # No new head: the bundle, its export and its calibration are unchanged
    vs_rest_class: Optional[str] = None
    vs_rest_weight: float = 0.0


class OptimConfig(_Strict):
    lr: float = 1e-4
    head_lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    accumulate: int = 1


class HardCaseConfig(_Strict):
    """Hard-case weighting: lesions whose manifest ``column`` equals ``level`` (e.g. Derm7pt's difficulty = high, the
    atypical lesions) are drawn ``factor`` times as often as the other lesions of their class. The weights are
    renormalised within each class, so the class mix the sampler draws — the prior the calibration undoes — is
    unchanged."""
    column: str = "difficulty"
    level: Union[str, int, float] = "high"   # a number matches a numeric column by value (1 matches 1.0)
    factor: float = Field(2.0, ge=1.0, le=20.0)


class TrainConfig(_Strict):
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    threads: int = Field(0, ge=0)  # torch compute threads for the run; 0 = torch's default (one per core)
    precision: Literal["auto", "fast", "fp32", "bf16"] = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fast (bf16 where native) | fp32 | bf16
    channels_last: bool = True     # NHWC images + conv weights (CUDA; CPU too: +19% for ResNet-18 here)
    compile: bool = False
    grad_checkpointing: bool = False
    ema: float = 0.0               # 0 = off, else decay e.g. 0.999
    sampler_power: float = 0.5     # class-balanced sampling: 0 natural, 0.5 sqrt, 1 balanced
    hard_cases: Optional[HardCaseConfig] = None   # draw the atypical lesions more often within their class
    early_stopping_patience: int = 0   # 0 = off; on the task's official metric
    validate_every: int = 1        # validate every N epochs and after the last; 0 = no per-epoch validation
    logit_adjustment_tau: float = 0.0
    tta: int = 0
    # the fold's last pass over its validation lesions (the out-of-fold predictions): "auto" runs it on ONNX Runtime
    # float32 on a CPU when onnxruntime is installed and the pass has >= 512 images (validation lesions x TTA views;
    # the same numbers within 1e-5, 3-5x faster than eager here; a smaller pass does not repay the export), else eager
    # float32; "onnx" always on ONNX Runtime (CPU); "eager" always eager PyTorch ("trained", its old name). Always
    # float32, whatever the training precision: the engine serves float32 numbers, and they are what is calibrated
    oof_backend: Literal["auto", "onnx", "eager", "trained"] = "auto"
    max_steps_per_epoch: int = 0   # 0 = full epoch (for quick smoke runs)
    # progressive resizing: the training input size of each epoch (the last repeats); evaluation and the bundle
    # use the backbone's size. Small early epochs cost a fraction of the compute (fast.ai / EfficientNetV2).
    epoch_sizes: Optional[list[int]] = None


class CVConfig(_Strict):
    k: int = 5
    seed: int = 0
    folds: Optional[list[int]] = None


class CalibrationConfig(_Strict):
    """What a run fits on its out-of-fold predictions and writes into every bundle (``training.run_calibration``):
    posteriors, the balanced rule, MILK10k cuts, the triage operating point and the conformal differential."""
    temperature: bool = True            # false: no fitting at all (posterior: prior)
    # bias_temperature: temperature + per-class bias fitted by log-loss (bias-corrected temperature scaling);
    # temperature: T fitted, bias from the sampler's prior by Bayes' rule; prior: that bias alone
    posterior: Literal["bias_temperature", "temperature", "prior"] = "bias_temperature"
    cuts: Union[Literal["auto"], bool] = "auto"   # per-class cuts for the MILK10k score (auto: nested estimate decides)
    # the balanced rule (the challenge files' decision): training_prior divides the posteriors by the training prior
    # (** prior_strength; no tuning, also for --folds full runs without OOF); balanced_accuracy tunes the strength on
    # OOF; none: the files carry the posteriors
    prior_adjustment: Literal["none", "balanced_accuracy", "training_prior"] = "none"
    prior_strength: float = Field(1.0, ge=0.0, le=4.0)
    eval_size: Optional[int] = None     # lesions in the set to be scored (MILK10k cuts)
    # the triage operating point chosen on OOF posteriors (dermfusion operating-point re-chooses it for other targets)
    melanoma_sensitivity: float = Field(0.95, gt=0.0, le=1.0)
    # every cancer too (BCC, AKIEC, …), not melanoma alone; null = melanoma alone (a warning says what slips)
    malignant_sensitivity: Optional[float] = Field(0.95, gt=0.0, le=1.0)
    max_urgent_rate: Optional[float] = Field(0.10, gt=0.0, le=1.0)
    conformal_level: float = Field(0.95, ge=0.5, lt=1.0)   # the differential's coverage
    # a higher coverage for some classes, e.g. {MEL: 0.97}: each class of a Mondrian set is calibrated on its own
    conformal_class_levels: dict[str, float] = Field(default_factory=dict)


class TrackingConfig(_Strict):
    """Experiment tracking (``training/tracking.py``; ``pip install 'dermfusion[tracking]'``). Off by default."""
    mlflow: bool = False                # log params, fold metrics, OOF figures and the bundles to MLflow
    uri: Optional[str] = None           # tracking URI; None = a local file store, file:RUN/mlruns (no network)
    experiment: Optional[str] = None    # MLflow experiment name; None = the config's name


class NetworkModelConfig(BaseModel):
    """A network from the model registry. Its other keys are the registered model's constructor settings
    (``fusion_dim``, ``encoder`` …): which ones exist depends on ``name``, so they are checked against the
    model itself before training (``models.check_model_settings``), with the nearest valid name on a typo."""
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    kind: Literal["network"] = "network"
    name: str = "trimodal_fusion"


class TabularFeaturesConfig(_Strict):
    derived: bool = True           # clinical-dermoscopic differences, means, log-ratios, shares, missing count, age band
    use_metadata: bool = True


class TabularModelConfig(_Strict):
    """The gradient-boosted (or logistic) expert on concepts + metadata (``tabular.train``)."""
    kind: Literal["tabular"] = "tabular"
    name: Optional[str] = None
    backend: Literal["lightgbm", "xgboost", "logreg"] = "lightgbm"
    params: dict[str, Any] = Field(default_factory=dict)   # passed to the backend (its own names)
    class_weight: Optional[Literal["sqrt", "balanced"]] = None
    early_stopping_rounds: int = 100
    validation_fraction: float = 0.15
    seed: int = 0
    refit_full: bool = True
    features: TabularFeaturesConfig = Field(default_factory=TabularFeaturesConfig)
    n_jobs: int = 1


ModelConfig = Annotated[Union[NetworkModelConfig, TabularModelConfig], Field(discriminator="kind")]


class ExperimentConfig(_Strict):
    name: str = "experiment"
    task: str = "milk10k"
    model: ModelConfig = Field(default_factory=NetworkModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # an ensemble recipe: one model per entry, each this config with the entry's dotted-key overrides
    # ({} = as written); `dermfusion train` trains them all into one run and `predict RUN` averages them
    members: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("model", mode="before")
    @classmethod
    def _default_kind(cls, v):
        return {"kind": "network", **v} if isinstance(v, dict) and "kind" not in v else v

    def model_kwargs(self) -> dict:
        d = self.model.model_dump()
        d.pop("kind"), d.pop("name")
        return d


def _parse_value(v: str) -> Any:
    return yaml.safe_load(v)


def set_dotted(raw: dict, key: str, value: Any) -> dict:
    """``raw["a"]["b"] = value`` for ``key = "a.b"`` (sections created as needed)."""
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is not a section")
    node[parts[-1]] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, val = item.split("=", 1)
        set_dotted(raw, key, _parse_value(val))
    return raw


# settings every member of an ensemble must share: the averaged probabilities get one calibration
_SHARED_BY_MEMBERS = ("task", "calibration", "cv", "train.sampler_power", "model.kind")


def member_configs(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """The configs of an ensemble recipe's members (``members:``), or ``[cfg]`` for a single model."""
    if not cfg.members:
        return [cfg]
    base = cfg.model_dump()
    base.pop("members")
    out = []
    for i, overrides in enumerate(cfg.members):
        raw = copy.deepcopy(base)
        for key, value in (overrides or {}).items():
            set_dotted(raw, key, value)
        member = validate_config(raw, f"{cfg.name} members[{i}]")
        for key in _SHARED_BY_MEMBERS:
            a, b = _dotted(cfg, key), _dotted(member, key)
            if a != b:
                raise ConfigError(f"{cfg.name} members[{i}] changes {key} ({a!r} → {b!r}); the members of an "
                                  f"ensemble share it (their averaged probabilities get one calibration)")
        out.append(member)
    return out


def _dotted(cfg: BaseModel, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node.model_dump() if isinstance(node, BaseModel) else node


def resolve_config_path(name: str | Path) -> Path:
    """A YAML file path, or the name of a built-in config (``tiny_cpu``, ``ham10000_pretrained`` …). A directory of
    the same name in the working directory does not shadow a built-in name."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    if p.is_dir():
        raise ConfigError(f"config {name} is a directory; pass a YAML file or a built-in config name")
    known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name} not found (built-in configs: {known})")


def read_yaml_mapping(path: str | Path, error: type[Exception], what: str) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); ``error`` with a one-line message naming
    ``what`` the file is when it is missing, not YAML, or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise error(f"{p}: expected a mapping at the top level")
    return raw


def load_raw(name: str | Path, overrides: list[str] | None = None) -> dict:
    raw = yaml.safe_load(resolve_config_path(name).read_text()) or {}
    return apply_overrides(raw, overrides or [])


def load_config(name: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    return validate_config(load_raw(name, overrides), str(name))


def validate_config(raw: dict, source: str = "config") -> ExperimentConfig:
    """The typed config, or a ConfigError whose message names each bad key (and the nearest valid one)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config {source}: " + "; ".join(_explain(err) for err in e.errors())) from None


def _explain(err: dict) -> str:
    """One line per pydantic error: the key's dotted path, what is wrong, and the nearest valid key."""
    loc = [str(p) for p in err["loc"] if str(p) not in {"network", "tabular"}]  # drop the union's tags
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(err["loc"][:-1])
        return f"unknown key {where}" + nearest_hint(loc[-1], valid)
    if err["type"] == "union_tag_invalid":
        return f"{where}.kind must be 'network' or 'tabular'"
    return f"{where}: {err['msg']}"


def nearest_hint(key: str, valid) -> str:
    """'; did you mean X?' for the closest valid name (difflib), else the list of valid names."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f" — did you mean {close[0]!r}?"
    return f" (valid: {', '.join(valid)})" if valid else ""


def _fields_at(loc) -> list[str]:
    """Field names of the config section at ``loc`` (e.g. ('model', 'tabular', 'features'))."""
    tags = {"network": NetworkModelConfig, "tabular": TabularModelConfig}
    cls: Any = ExperimentConfig
    for part in loc:
        if part in tags:
            cls = tags[part]
            continue
        field = getattr(cls, "model_fields", {}).get(part) if cls is not None else None
        if field is None:
            return []
        ann = field.annotation  # a section (a model class), or the model union resolved by the next tag
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(getattr(cls, "model_fields", {})) if cls is not None else []
