"""Explanations: per-modality heat maps (attention rollout for ViTs, Grad-CAM for CNNs) and the fusion
model's attention over concepts and metadata, overlaid on the original images.

    explainer = Explainer(predictor.model)          # hooks installed once, thread-safe
    result = explainer.run(batch)                   # prediction + maps in one forward pass
    overlay, heat = overlay_heatmap(pil_image, result.maps["dermoscopic"][0])
"""
from .explainer import ExplainResult, Explainer
from .fusion import concept_label, fusion_contributions
from .overlay import center_crop_box, heatmap_image, heatmap_to_image_size, overlay_heatmap, png_base64, png_bytes

__all__ = ["Explainer", "ExplainResult", "fusion_contributions", "concept_label", "overlay_heatmap",
           "heatmap_to_image_size", "heatmap_image", "center_crop_box", "png_base64", "png_bytes"]
