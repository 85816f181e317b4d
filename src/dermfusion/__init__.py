"""dermfusion: multi-modal skin-lesion diagnosis (clinical + dermoscopic images + metadata)."""

__version__ = "0.1.0"
