"""Inference: bundles → predictors (batching, test-time augmentation, calibration, backends).

  predictor      Predictor, AveragePredictor and the one ensemble rule
  load           the bundle-kind table, load_predictor(bundle), load_run(bundle | run | list)
  network        NetworkPredictor (the "network" kind)
  tabular_kinds  the "tabular", "ensemble" and "stack" kinds
  backends       fp32 / bf16 / autocast / int8 / compile / ONNX Runtime, and the choice between them
  predict_loop   the batched, test-time-augmented forward pass
  embeddings     a network's image embeddings (covariate-shift check)
"""
from .load import KINDS, load_predictor, load_run
from .predictor import AveragePredictor, Predictor

__all__ = ["KINDS", "AveragePredictor", "Predictor", "load_predictor", "load_run"]
