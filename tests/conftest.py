import os
from pathlib import Path

import pytest

os.environ.setdefault("DERMFUSION_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = Path(__file__).resolve().parents[1] / "src" / "dermfusion" / "fixtures" / "ham10000_sample"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def ham_sample(tmp_path_factory):
    """The bundled 48-image HAM10000 sample as a manifest with 2 folds."""
    from dermfusion.data.folds import assign_folds
    from dermfusion.data.importers import import_isic
    from dermfusion.tasks import ISIC2018

    df = import_isic(FIXTURE / "train.csv", FIXTURE / "images", ISIC2018, dataset="ham10000_sample")
    return assign_folds(df, ISIC2018, k=2, seed=0)
