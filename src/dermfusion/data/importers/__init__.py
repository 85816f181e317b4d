"""Importers turn a public dataset's CSVs into a dermfusion manifest (one row per lesion)."""
from .derm7pt import import_derm7pt
from .isic import import_isic
from .milk10k import import_milk10k
from .pad_ufes import import_pad_ufes

__all__ = ["import_milk10k", "import_isic", "import_derm7pt", "import_pad_ufes"]
