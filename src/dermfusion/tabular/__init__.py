"""Gradient-boosted experts on MONET concepts + metadata, stacking and weighted ensembles.

  features   manifest -> deterministic feature table (raw concepts, metadata, derived features)
  expert     TabularExpert: LightGBM / XGBoost multiclass estimator with class weighting + early stopping
  train      train_tabular_cv: per-fold models, out-of-fold probabilities, calibrated refit bundle
  stacking   fit_stack: fold-aware meta-model on several runs' out-of-fold probabilities
  ensemble   search_weights / write_ensemble_bundle / compare_table
"""
from .expert import TabularExpert
from .features import TabularFeatureSpec, build_features

__all__ = ["TabularExpert", "TabularFeatureSpec", "build_features"]
