"""Data stage: importers -> Manifest (one row per lesion) -> LesionDataset -> Batch."""
