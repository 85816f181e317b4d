"""``dermfusion weights check``: will this downloaded foundation-model file work? A thirty-second answer.

1. The file's tensors against the *upstream* key set (foundations.py → upstream_keys/*.json): missing, unexpected
   and mis-shaped keys by their upstream names (wrapper prefixes the publishers add are accepted and counted; a
   renamed key gets a "did you mean"), independent of dermfusion's own key mapping.
2. The strict load dermfusion itself does (the same entry point training / the concept scorer use).
3. One forward pass on the bundled sample images with the encoder's published preprocessing, and statistics of
   the embeddings: width, mean / std, norms, non-finite values and the mean cosine similarity between different
   images (close to 1: every image embeds alike — an untrained or collapsed encoder, or the wrong preprocessing).
"""
from __future__ import annotations

import difflib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.images import read_image, resize_short_side
from ..data.transforms import Preprocess, eval_transform
from .backbones import create_backbone
from .checkpoint import read_state_dict, strip_key_prefixes
from .clip_family import _is_jit_archive, create_clip
from .foundations import Foundation

SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "fixtures" / "ham10000_sample" / "images"
GENERIC_PREFIXES = ("module.",)  # DDP


@dataclass
class KeyReport:
    expected: int
    in_file: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    stripped: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    did_you_mean: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)


@dataclass
class WeightsReport:
    foundation: Foundation
    path: Path
    keys: KeyReport
    sources: list[str]
    load_error: str | None = None
    loaded_as: str = ""
    forward: dict | None = None
    preprocess: dict | None = None

    @property
    def ok(self) -> bool:
        f = self.forward
        return self.keys.ok and self.load_error is None and f is not None and f["nonfinite"] == 0


def read_tensors(path: Path, foundation: Foundation) -> dict[str, torch.Tensor]:
    if foundation.load == "monet" and _is_jit_archive(path):
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    return read_state_dict(path)


def compare_keys(tensors: dict[str, torch.Tensor], doc: dict, ignore: tuple[str, ...] = ()) -> KeyReport:
    """The file's keys (wrapper prefixes removed) against the upstream key set ``doc["keys"]``."""
    prefixes = GENERIC_PREFIXES + tuple(doc.get("accepted_prefixes", ()))
    stripped: Counter = Counter()
    found: dict[str, tuple[int, ...]] = {}
    ignored = []
    for key, value in tensors.items():
        key, removed = strip_key_prefixes(key, prefixes)
        stripped.update(removed)
        if key in ignore:
            ignored.append(key)
            continue
        found[key] = tuple(value.shape)
    expected = {k: tuple(v) for k, v in doc["keys"].items()}
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = [f"{k}: file {found[k]} vs upstream {expected[k]}" for k in expected
             if k in found and found[k] != expected[k]]
    hints = {}
    for k in unexpected:
        close = difflib.get_close_matches(k, missing, n=1, cutoff=0.8)
        if close:
            hints[k] = close[0]
    return KeyReport(len(expected), len(tensors), missing, unexpected, wrong, dict(stripped), sorted(ignored), hints)


def load_encoder(foundation: Foundation, path: Path):
    """(module, embed: images → embeddings, data config, what was built) through dermfusion's own loaders, which
    load strictly."""
    if foundation.load == "backbone":
        bb = create_backbone(dict(foundation.spec), pretrained_path=path).eval()
        return bb, (lambda x: bb.forward_tokens(x)[1]), bb.data_config, bb.name
    if foundation.load == "monet":
        clip = create_clip(f"monet:{path}", arch=foundation.spec.get("arch"))
    else:  # open_clip builds from the download directory's open_clip_config.json
        clip = create_clip(f"open_clip:{(path if path.is_dir() else path.parent).resolve()}")
    return clip.model, clip.encode_image, clip.data_config, clip.name


def sample_batch(data_config: dict, n: int) -> tuple[torch.Tensor, Preprocess]:
    pre = Preprocess.from_data_config(data_config)
    tf = eval_transform(pre)
    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:n]
    imgs = [torch.from_numpy(np.array(resize_short_side(read_image(p), pre.eval_resize, pre.interpolation)))
            .permute(2, 0, 1).contiguous() for p in paths]
    return torch.stack([tf(x) for x in imgs]), pre


def embedding_stats(e: torch.Tensor) -> dict:
    e = e.float()
    finite = torch.isfinite(e)
    out = {"n_images": int(e.shape[0]), "dim": int(e.shape[-1]), "nonfinite": int((~finite).sum())}
    if out["nonfinite"]:
        return out
    norms = e.norm(dim=-1)
    u = torch.nn.functional.normalize(e, dim=-1)
    sim = u @ u.T
    off = sim[~torch.eye(len(e), dtype=torch.bool)]
    out.update(mean=float(e.mean()), std=float(e.std()), min=float(e.min()), max=float(e.max()),
               norm_mean=float(norms.mean()), norm_std=float(norms.std()) if len(e) > 1 else 0.0,
               mean_cosine=float(off.mean()) if off.numel() else float("nan"))
    return out


def check_weights(path: str | Path, foundation: Foundation, *, n_images: int = 4, device: str = "cpu") -> WeightsReport:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory ({foundation.download or 'download it first'})")
    doc = foundation.upstream()
    sources = sorted({f"{s['repository']}@{s['commit'][:7]}" for s in doc.get("upstream", [])})
    keys = compare_keys(read_tensors(path, foundation), doc, foundation.drop)
    report = WeightsReport(foundation, path, keys, sources)
    try:
        module, embed, dc, report.loaded_as = load_encoder(foundation, path)
    except Exception as e:  # noqa: BLE001 — any refusal is the answer; the report prints it
        report.load_error = f"{type(e).__name__}: {e}"
        return report
    x, pre = sample_batch(dc, n_images)
    report.preprocess = pre.to_dict()
    module.to(device)
    t = time.perf_counter()
    with torch.no_grad():
        e = embed(x.to(device))
    report.forward = dict(embedding_stats(e.cpu()), seconds=time.perf_counter() - t, size=pre.size, device=device)
    return report
