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


@pytest.fixture(scope="session")
def ham_manifest(tmp_path_factory, ham_sample) -> Path:
    """The bundled sample as a manifest file (2 folds)."""
    from dermfusion.data.manifest import save_manifest

    return save_manifest(ham_sample, tmp_path_factory.mktemp("ham_manifest") / "ham.parquet")


@pytest.fixture(scope="session")
def network_run(tmp_path_factory, ham_sample) -> Path:
    """A trained network run on the bundled sample: tiny_cpu, 1 epoch, both folds (fold bundles, oof.csv,
    calibration, summary.json) — what `dermfusion train` writes."""
    from dermfusion.config import load_config
    from dermfusion.training.cv import train_cv

    out = tmp_path_factory.mktemp("network_run") / "run"
    train_cv(load_config("tiny_cpu", ["train.epochs=1", "train.device=cpu"]), ham_sample, out)
    return out


@pytest.fixture(scope="session")
def tabular_run(tmp_path_factory, ham_sample) -> Path:
    """A trained tabular run on the bundled sample (logistic regression on age / sex / site): fold bundles under
    RUN/folds, the calibrated full-data refit in RUN/bundle."""
    from dermfusion.config import load_config
    from dermfusion.training.cv import train_cv

    out = tmp_path_factory.mktemp("tabular_run") / "run"
    train_cv(load_config("milk10k_logreg", ["task=isic2018", "name=ham_logreg", "calibration.eval_size=null"]),
             ham_sample, out)
    return out


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (timings and tiny models; two cores stay free for the rest); restored after.
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch  # only the tests that ask for it pay for importing torch here

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
