"""Hard-case weighting (``train.hard_cases``): atypical lesions are drawn more often within their class, and the
class mix the sampler draws — the prior the calibration undoes — does not move."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermfusion.config import HardCaseConfig, validate_config
from dermfusion.data.dataset import class_balanced_sampler, class_balanced_weights, hard_case_factors
from dermfusion.data.manifest import ManifestError


def _targets(y, k=3):
    return np.eye(k)[np.asarray(y)]


def test_factors_move_weight_within_a_class_and_keep_each_class_total():
    y = [0, 0, 0, 0, 1, 1, 2]
    f = np.array([4.0, 1, 1, 1, 1, 1, 4])
    plain = class_balanced_weights(_targets(y), 0.5)
    hard = class_balanced_weights(_targets(y), 0.5, f)
    for c in range(3):
        idx = np.flatnonzero(np.asarray(y) == c)
        assert hard[idx].sum() == pytest.approx(plain[idx].sum())
    # class 0: the hard lesion weighs 4 times each of the other three
    assert hard[0] == pytest.approx(4 * hard[1])
    # a class whose only lesion is hard keeps its weight
    assert hard[6] == pytest.approx(plain[6])


def test_the_sampler_draws_hard_lesions_more_often_at_the_same_class_mix():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    f = np.where(rng.random(600) < 0.2, 3.0, 1.0)
    draws_plain = np.array(list(class_balanced_sampler(_targets(y), 0.5, num_samples=60000, seed=1)))
    draws_hard = np.array(list(class_balanced_sampler(_targets(y), 0.5, num_samples=60000, seed=1, within_class=f)))
    mix = [np.bincount(y[d], minlength=3) / len(d) for d in (draws_plain, draws_hard)]
    assert np.abs(mix[0] - mix[1]).max() < 0.01
    share = [np.mean(f[d] > 1) for d in (draws_plain, draws_hard)]
    expected = 3 * 0.2 / (3 * 0.2 + 0.8)  # about 0.43 of the draws, against 0.2 without
    assert share[0] == pytest.approx(np.mean(f > 1), abs=0.01)
    assert share[1] == pytest.approx(expected, abs=0.03)


def test_factors_from_the_manifest_column_and_clear_errors():
    df = pd.DataFrame({"difficulty": ["high", "low", None, "medium", "high"]})
    f = hard_case_factors(df, HardCaseConfig(column="difficulty", level="high", factor=3))
    assert f.tolist() == [3.0, 1.0, 1.0, 1.0, 3.0]
    assert hard_case_factors(df, None) is None
    numeric = pd.DataFrame({"atypia_grade": [1.0, 2.0, np.nan, 1.0]})
    assert hard_case_factors(numeric, HardCaseConfig(column="atypia_grade", level=1, factor=2)).tolist() == \
        [2.0, 1.0, 1.0, 2.0]
    with pytest.raises(ManifestError, match="no column 'atypical'"):
        hard_case_factors(df, HardCaseConfig(column="atypical"))
    with pytest.raises(ManifestError, match="no training lesion"):
        hard_case_factors(df, HardCaseConfig(level="extreme"))


def test_the_config_takes_hard_cases_and_refuses_a_factor_below_one():
    cfg = validate_config({"name": "x", "task": "derm7pt",
                           "train": {"hard_cases": {"column": "difficulty", "level": "high", "factor": 3}}})
    assert cfg.train.hard_cases.factor == 3
    with pytest.raises(ValueError, match="factor"):
        validate_config({"name": "x", "task": "derm7pt", "train": {"hard_cases": {"factor": 0.5}}})


def test_the_trainer_draws_with_the_configured_hard_case_factors(ham_sample, tmp_path):
    """The wiring: a fold trainer built with ``train.hard_cases`` hands its sampler the factors of its own training
    rows (in the dataset's row order), and without the setting the draw is the plain class-balanced one."""
    from dermfusion.config import load_config
    from dermfusion.tasks import ISIC2018
    from dermfusion.training.engine import FoldTrainer

    df = ham_sample.copy()
    df["difficulty"] = np.where(np.arange(len(df)) % 3 == 0, "high", "low")
    weights = {}
    for name, extra in (("plain", []), ("hard", ["train.hard_cases={column: difficulty, level: high, factor: 4}"])):
        cfg = load_config("tiny_cpu", ["train.batch_size=8", *extra])
        tr = FoldTrainer(cfg, ISIC2018, df, 0, str(tmp_path / name))
        tr.setup()
        loader = tr.train_loader(range(0, 1))
        weights[name] = loader.batch_sampler.make_sampler(0).weights.numpy()
        rows = loader.dataset.df
    y = loader.dataset.targets
    f = np.where(rows["difficulty"].eq("high"), 4.0, 1.0)
    assert np.allclose(weights["plain"] / weights["plain"].sum(), class_balanced_weights(y, 0.5))
    assert np.allclose(weights["hard"] / weights["hard"].sum(), class_balanced_weights(y, 0.5, f))
    assert not np.allclose(weights["hard"] / weights["hard"].sum(), weights["plain"] / weights["plain"].sum())
