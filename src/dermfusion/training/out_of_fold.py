"""A fold's last pass over its validation lesions: the out-of-fold predictions everything after training is fitted
on (calibration, the operating point, the conformal differential)."""
from __future__ import annotations

import importlib.util

import numpy as np

from ..console import console
from ..inference.backends import prepare_backend
from ..inference.predict_loop import predict_probs


def predict_out_of_fold(trainer, model, tta: int = 0) -> np.ndarray:
    """``trainer``'s validation lesions through ``model``: on ONNX Runtime float32 when ``train.oof_backend`` is auto,
    the fold runs on a CPU in one process and onnxruntime is installed (exact to ~1e-5: an fp32 graph of the same
    weights, 3-5x faster than eager here), else eager as trained. A failed export falls back to eager."""
    if trainer.cfg.train.oof_backend == "auto" and trainer.device.type == "cpu" and trainer.world == 1 \
            and importlib.util.find_spec("onnxruntime") is not None:
        try:
            runner = prepare_backend(model.eval(), "onnx", device=trainer.device)
        except Exception as e:  # noqa: BLE001 — any export / session failure: the eager pass still works
            console.print(f"[yellow]out-of-fold pass: ONNX Runtime unavailable ({str(e).splitlines()[0][:120]}); "
                          "predicting eagerly[/]")
        else:
            try:
                return predict_probs(runner, trainer._loader(trainer.val_df), trainer.device, None, False, tta=tta,
                                     modalities=trainer.spec.modalities)
            except Exception as e:  # noqa: BLE001 — e.g. a graph whose batch size was fixed at export: eager works
                console.print(f"[yellow]out-of-fold pass: ONNX Runtime failed ({str(e).splitlines()[0][:120]}); "
                              "predicting eagerly[/]")
    return trainer.predict(trainer.val_df, model, tta=tta)
