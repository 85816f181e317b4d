import os
from pathlib import Path

import pytest

os.environ.setdefault("DERMFUSION_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = Path(__file__).resolve().parents[1] / "src" / "dermfusion" / "fixtures" / "ham10000_sample"
CONSOLE_WIDTH = 1000  # the test console: wider than any message, path or table the tests print


@pytest.fixture(scope="session", autouse=True)
def plain_wide_console():
    """Every test sees the CLI's output on a fixed, wide, plain console, whatever the terminal: rich wraps at the
    console width ($COLUMNS, the terminal's width, or 80 when output is not a terminal), so an assertion on a
    message would otherwise hold or not with the terminal and the length of the temporary path; FORCE_COLOR (or
    typer's GITHUB_ACTIONS rule) would put escape codes into the text. Session-scoped so that module and session
    fixtures that run the CLI are covered too. The package's consoles already exist (test modules import the CLI at
    collection, reading $COLUMNS then), so their width is pinned in place; consoles made later (typer's error
    panels, subprocesses) read the environment."""
    import typer.rich_utils

    from dermfusion import console as df_console

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", str(CONSOLE_WIDTH))
        mp.setenv("_TYPER_FORCE_DISABLE_TERMINAL", "1")
        for var in ("FORCE_COLOR", "PY_COLORS", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
            mp.delenv(var, raising=False)
        for c in (df_console.console, df_console.err_console):
            mp.setattr(c, "_width", CONSOLE_WIDTH)  # rich's own field: `Console(width=…)` sets it, $COLUMNS too
            mp.setattr(c, "_force_terminal", False)  # and no colour, even where FORCE_COLOR chose one at import
            mp.setattr(c, "_color_system", None)
        mp.setattr(typer.rich_utils, "FORCE_TERMINAL", False)
        mp.setattr(typer.rich_utils, "MAX_WIDTH", CONSOLE_WIDTH)
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cli: runs the CLI and reads what it printed, in the test or a fixture it uses "
                                       "(marked automatically)")


def pytest_collection_modifyitems(config, items):
    from cli_helpers import reads_cli_output

    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs if fixtures is not None else {}
        fns = [getattr(item, "function", None)] + [d.func for name in item.fixturenames for d in defs.get(name, ())]
        if any(fn is not None and reads_cli_output(fn) for fn in fns):
            item.add_marker(pytest.mark.cli)


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
