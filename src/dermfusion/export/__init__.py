"""Export trained networks for serving outside dermfusion: ONNX graphs and Triton model repositories."""
from .onnx import (ExportParityError, ExportResult, batch_to_onnx_inputs, check_parity, export_bundle_onnx,
                   export_onnx, input_specs, read_metadata, synthetic_batch)
from .triton import parse_pbtxt, triton_config, write_triton_repository

__all__ = ["ExportParityError", "ExportResult", "batch_to_onnx_inputs", "check_parity", "export_bundle_onnx",
           "export_onnx", "input_specs", "read_metadata", "synthetic_batch", "parse_pbtxt", "triton_config",
           "write_triton_repository"]
