"""Model cards (Mitchell et al. 2019): built from a bundle, its training run, an evaluation and a shift check.

  build          build_model_card, write_model_card, write_run_cards, card_for_service
  sections       model details, intended use, training data
  performance    held-out evaluation, out-of-fold metrics with bootstrap CIs
  evidence       subgroups, label provenance, covariate shift, calibration
  failure_modes  known failure modes derived by stated screening rules
  render         Markdown, self-contained HTML, the evaluation report's link
  sources        metric names, source references, number checks
"""
from .build import CARD_FILES, CARD_SCHEMA, build_model_card, card_for_service, write_model_card, write_run_cards
from .performance import oof_metrics
from .render import link_report, render_html, render_markdown

__all__ = ["CARD_FILES", "CARD_SCHEMA", "build_model_card", "card_for_service", "link_report", "oof_metrics",
           "render_html", "render_markdown", "write_model_card", "write_run_cards"]
