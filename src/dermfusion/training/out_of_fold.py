"""A fold's last pass over its validation lesions: the out-of-fold predictions everything after training is fitted
on (calibration, the operating point, the conformal differential).

Always in float32 — ONNX Runtime float32 or eager float32 — whatever precision the model trained in: the engine
serves with exact (float32) backends unless an agreement record approves another, so the calibration, operating point
and prediction sets are fitted on the numbers that are served. (Before, an eager pass ran under the training's bf16
autocast on a GPU or a bf16 CPU: probabilities a few hundredths away from what `predict` and the service answer.)"""
from __future__ import annotations

import importlib.util

import numpy as np

from ..console import console
from ..inference.backends import prepare_backend
from ..inference.predict_loop import predict_probs

# below this many forward images (validation lesions × test-time views) exporting the graph costs more than it saves:
# an export takes ~5-15 s for a CNN (100 s for a RemixFormer), and ONNX Runtime saves ~15-20 ms per image on 2 cores
ONNX_MIN_IMAGES = 512


def uses_onnx(trainer, tta: int = 0) -> bool:
    """Whether the out-of-fold pass runs on ONNX Runtime float32: ``train.oof_backend`` onnx, or auto on a CPU in one
    process with onnxruntime installed and a pass of at least ``ONNX_MIN_IMAGES`` images (else eager float32)."""
    choice = trainer.cfg.train.oof_backend
    if choice in ("eager", "trained") or trainer.device.type != "cpu" or trainer.world != 1 \
            or importlib.util.find_spec("onnxruntime") is None:
        return False
    return choice == "onnx" or len(trainer.val_df) * max(1, tta) >= ONNX_MIN_IMAGES


def predict_out_of_fold(trainer, model, tta: int = 0) -> np.ndarray:
    """``trainer``'s validation lesions through ``model``: on ONNX Runtime float32 when ``uses_onnx`` (exact to
    ~1e-5: an fp32 graph of the same weights, 3-5x faster than eager here), else eager float32. A failed export
    falls back to eager float32."""
    if uses_onnx(trainer, tta):
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
    return trainer.predict(trainer.val_df, model, tta=tta, exact=True)
