"""The model zoo table (models/zoo.json) is the one source of truth for which families are experimental: it covers
every registered network and tabular backend and every built-in config, README's "Model zoo" table agrees with it,
and `dermfusion train --help` lists its experimental families."""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dermfusion.cli import app
from dermfusion.cli.train import experimental_families, model_zoo
from dermfusion.models import list_models
from dermfusion.tabular.expert import BACKENDS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "src" / "dermfusion" / "configs"


def _readme_rows() -> dict[str, str]:
    """README's "Model zoo" table: family → its row."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Model zoo\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_:]+)`", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_the_zoo_covers_every_family_and_config():
    zoo = model_zoo()
    families = [f["family"] for f in zoo]
    assert len(families) == len(set(families))
    assert set(families) == set(list_models()) | {f"tabular:{b}" for b in BACKENDS}
    listed = [c for f in zoo for c in f["configs"]]
    assert len(listed) == len(set(listed)), "a config is listed under two families"
    assert set(listed) == {p.stem for p in CONFIGS.glob("*.yaml")}, "every built-in config, once"
    for f in zoo:
        for name in f["configs"]:
            model = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]
            family = f"tabular:{model.get('backend', 'lightgbm')}" if model.get("kind") == "tabular" else model["name"]
            assert family == f["family"], f"{name}.yaml builds {family}, listed under {f['family']}"


def test_readme_model_zoo_agrees_with_the_table():
    rows = _readme_rows()
    zoo = {f["family"]: f for f in model_zoo()}
    assert set(rows) == set(zoo), "one README row per family of models/zoo.json"
    for family, f in zoo.items():
        row = rows[family]
        assert ("*experimental*" in row) == f["experimental"], f"{family}: the experimental mark differs"
        for name in f["configs"]:
            assert f"`{name}`" in row, f"{family}: README row does not name config {name}"
        if not f["experimental"]:
            assert "BENCHMARKS.md" in row or "scored independently" in row, f"{family}: where is its figure from?"


def test_train_help_lists_the_experimental_families():
    res = CliRunner().invoke(app, ["train", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert experimental_families() and "Experimental model families" in text
    for family in experimental_families():
        assert family in text
    for family in {f["family"] for f in model_zoo()} - set(experimental_families()):
        assert family not in text.split("Experimental model families", 1)[1].split(".", 1)[0]
