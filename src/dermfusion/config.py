"""Experiment configuration: YAML validated into typed objects (pydantic), with `--set key=value` overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    cache_dir: Optional[str] = "~/.cache/dermfusion/decode"
    num_workers: int = -1          # -1: sized to the machine
    aug_strength: float = 1.0
    use_metadata: bool = True
    use_concepts: bool = True
    modalities: Optional[list[str]] = None   # default: the task's modalities present in the manifest


class LossConfig(_Strict):
    name: str = "focal+soft_f1"    # ce | focal | focal+soft_f1 | ce+soft_f1
    gamma: float = 2.0
    alpha: Optional[str] = "inverse_frequency"   # inverse_frequency | none
    soft_f1_weight: float = 0.5
    label_smoothing: float = 0.0
    aux_weight: float = 0.3


class OptimConfig(_Strict):
    lr: float = 1e-4
    head_lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    accumulate: int = 1


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
    early_stopping_patience: int = 0   # 0 = off; on the task's official metric
    validate_every: int = 1        # validate every N epochs and after the last; 0 = no per-epoch validation
    logit_adjustment_tau: float = 0.0
    tta: int = 0
    max_steps_per_epoch: int = 0   # 0 = full epoch (for quick smoke runs)
    # progressive resizing: the training input size of each epoch (the last repeats); evaluation and the bundle
    # use the backbone's size. Small early epochs cost a fraction of the compute (fast.ai / EfficientNetV2).
    epoch_sizes: Optional[list[int]] = None


class CVConfig(_Strict):
    k: int = 5
    seed: int = 0
    folds: Optional[list[int]] = None


class ModelConfig(_Strict):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    kind: str = "network"          # network | tabular
    name: str = "trimodal_fusion"


class ExperimentConfig(_Strict):
    name: str = "experiment"
    task: str = "milk10k"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    calibration: dict[str, Any] = Field(default_factory=lambda: {"temperature": True, "cuts": "auto"})

    def model_kwargs(self) -> dict:
        d = self.model.model_dump()
        d.pop("kind"), d.pop("name")
        return d


def _parse_value(v: str) -> Any:
    return yaml.safe_load(v)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, val = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = _parse_value(val)
    return raw


def resolve_config_path(name: str | Path) -> Path:
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if cand.exists():
            return cand
    known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name} not found (built-in configs: {known})")


def load_raw(name: str | Path, overrides: list[str] | None = None) -> dict:
    raw = yaml.safe_load(resolve_config_path(name).read_text()) or {}
    return apply_overrides(raw, overrides or [])


def load_config(name: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = load_raw(name, overrides)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config {name}:\n{e}") from None
