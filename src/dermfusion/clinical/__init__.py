"""The clinical engine: one path from a lesion (decoded images + metadata) to a decision — quality gate, model pass,
posteriors under a stated prior, decisions (balanced diagnosis, triage at an operating point, a conformal
differential), explanation on demand. ``dermfusion predict``, ``gate``, ``explain``, ``bench`` and the service all
call it (docs/CLINICAL.md, docs/ARCHITECTURE.md)."""
from .decisions import DecisionRules
from .engine import Assessment, Engine
from .lesion import Lesion, lesion_from_row, lesions_from_manifest
from .settings import ClinicalSettings

__all__ = ["Assessment", "ClinicalSettings", "DecisionRules", "Engine", "Lesion", "lesion_from_row",
           "lesions_from_manifest"]
