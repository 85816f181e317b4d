"""The evaluation report's link to the model card (written beside report.html by ``dermfusion card``)."""
from __future__ import annotations

from pathlib import Path

REPORT_LINK_ID = "model-card-link"


def report_link_html(out_dir) -> str:
    """The report's link line when out_dir/model_card.html exists (for ``evaluation.report``)."""
    if out_dir is None or not (Path(out_dir) / "model_card.html").exists():
        return ""
    return (f"<p id='{REPORT_LINK_ID}' style='margin:12px 0 0'>Model card: "
            "<a href='model_card.html'>model_card.html</a></p>")
