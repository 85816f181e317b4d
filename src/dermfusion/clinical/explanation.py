"""Explanations a person looks at: the engine's heat-map grids drawn over the original photos (at their aspect
ratio, the part the model saw marked), and the fusion model's attention shares."""
from __future__ import annotations

from ..explain import center_crop_box, overlay_heatmap, png_base64
from ..explain.overlay import display_size
from .settings import ExplainConfig


def render_heatmaps(images: dict, maps: dict, methods: dict, crop_pct: dict, cfg: ExplainConfig) -> list[dict]:
    """One overlay per explained image: ``{"modality", "method", "overlay_png_base64", "width", "height",
    "original_width", "original_height", "model_region"}``."""
    out = []
    for m, img in images.items():
        grid = maps.get(m)
        if grid is None:
            continue
        crop = crop_pct.get(m, 1.0)
        ov, _ = overlay_heatmap(img, grid, max_side=cfg.max_side, alpha=cfg.alpha, cmap=cfg.colormap, crop_pct=crop)
        w0, h0 = img.size
        out.append({"modality": m, "method": methods.get(m, ""), "overlay_png_base64": png_base64(ov),
                    "width": ov.size[0], "height": ov.size[1], "original_width": w0, "original_height": h0,
                    "model_region": list(center_crop_box(display_size((w0, h0), cfg.max_side), crop))})
    return out


def fusion_explanation(contributions: dict) -> dict | None:
    """The fusion model's attention shares over image, concept and metadata tokens (None for other models)."""
    if not contributions:
        return None
    c0 = contributions
    keys = ("name", "label", "weight", "present")
    return {"image": c0.get("image", {}), "none": c0.get("null", 0.0),
            "concepts": [{k: d[k] for k in keys} for d in c0.get("concepts", [])],
            "metadata": [{k: d[k] for k in keys} for d in c0.get("metadata", [])]}
