"""Inference stage: bundles, predictors (batching, TTA, calibration), submission files, export."""
