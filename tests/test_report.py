"""The evaluation report: alignment errors, fairness flags, figure labelling, strict JSON, and the HTML
opened in headless Chromium (no console errors, every image decoded). Screenshot to a temp folder, and
to tests/artifacts/report.png when DERMFUSION_ARTIFACTS is set.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermfusion.evaluation import figures as F
from dermfusion.evaluation.report import EvaluationError, align, evaluate_predictions, print_summary
from dermfusion.tasks import ISIC2018, MILK10K

CHROMIUM = os.environ.get("DERMFUSION_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
N = 240


def _synthetic(fixture_dir: Path, n: int = N, seed: int = 0):
    """A 7-class manifest (with images, metadata) and predictions in which skin tone 5 hides missed cancers."""
    rng = np.random.default_rng(seed)
    task = ISIC2018
    C = task.num_classes
    y = rng.integers(0, C, n)
    tone = rng.choice(["1", "2", "3", "5"], n)
    tone[:6] = "0"  # a slice too small to judge
    images = sorted(str(p) for p in (fixture_dir / "images").glob("*.jpg"))
    man = pd.DataFrame({
        "lesion_id": [f"LES_{i:04d}" for i in range(n)], "dataset": "synthetic", "patient_id": "", "split": "test",
        "fold": -1, "image_clinical": "", "image_dermoscopic": [images[i % len(images)] for i in range(n)],
        "age": rng.choice([np.nan, 25.0, 45.0, 65.0, 80.0], n), "sex": rng.choice(["male", "female", ""], n),
        "skin_tone": tone, "site": rng.choice(["back", "face", "lower extremity", ""], n)})
    for j, c in enumerate(task.classes):
        man[f"label_{c}"] = (y == j).astype(float)
    z = rng.normal(size=(n, C))
    z[np.arange(n), y] += 2.0
    mal = np.isin(y, task.malignant_indices) & (tone == "5")
    z[mal, task.index("NV")] += 4.0  # the model calls cancers on tone 5 benign nevi
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    pred = pd.DataFrame(p, columns=list(task.classes))
    pred.insert(0, "lesion_id", man["lesion_id"])
    return man, pred


@pytest.fixture(scope="module")
def built(tmp_path_factory, fixture_dir):
    man, pred = _synthetic(fixture_dir)
    out = tmp_path_factory.mktemp("report")
    csv = out / "predictions.csv"
    pred.to_csv(csv, index=False)
    metrics = evaluate_predictions(csv, man, ISIC2018, out, n_bootstrap=50)
    return out, metrics, man, pred


def test_outputs_and_strict_json(built):
    out, metrics, man, _ = built
    assert (out / "report.html").exists() and (out / "metrics.json").exists()

    def no_nan(c):
        raise AssertionError(f"metrics.json is not strict JSON: {c}")

    on_disk = json.loads((out / "metrics.json").read_text(), parse_constant=no_nan)
    assert on_disk["n"] == N and on_disk["task"] == "isic2018" and on_disk["official_metric"] == "balanced_accuracy"
    lo, hi = on_disk["ci"]["official"]
    assert lo <= on_disk["metrics"]["official"] <= hi
    assert set(on_disk["per_class"]) == set(ISIC2018.classes)
    assert len(on_disk["worst_errors"]) == 12


def test_fairness_flags_the_hidden_subgroup(built):
    _, metrics, _, _ = built
    rows = {(r["attribute"], r["group"]): r for r in metrics["fairness"]}
    assert rows[("all", "all")]["n"] == N
    assert rows[("skin_tone", "tone 5")]["status"] == "flagged"
    assert "malignant sensitivity" in rows[("skin_tone", "tone 5")]["reason"]
    assert rows[("skin_tone", "tone 0")]["status"] == "too small"
    assert rows[("skin_tone", "tone 1")]["status"] == "ok"
    assert [g for a, g in rows if a == "age"] == ["<30", "30-49", "50-69", "70+", "unknown"]
    assert ("sex", "unknown") in rows and ("site", "unknown") in rows


def test_every_figure_has_title_and_axis_labels(built):
    out, metrics, _, _ = built
    figs = metrics["figures"]
    assert {f["key"] for f in figs} == {"confusion_matrix", "roc", "precision_recall", "reliability", "f1_per_class"}
    for f in figs:
        assert f["title"].strip() and f["xlabel"].strip() and f["ylabel"].strip(), f
    fig, ax = F._new()
    ax.plot([0, 1], [0, 1])
    ax.set_title("unlabelled axes")
    with pytest.raises(ValueError, match="x label, y label"):
        F._render("bad", fig, ax)


def test_html_is_self_contained(built):
    out, _, _, _ = built
    html = (out / "report.html").read_text()
    assert "<script" not in html and "<link" not in html
    assert "src='http" not in html and 'src="http' not in html and "url(http" not in html
    assert html.count("data:image/png;base64,") == 5
    assert html.count("data:image/jpeg;base64,") == 12  # one thumbnail per listed error
    assert "class='flagged'" in html and "dermfusion" in html and f"{N} lesions" in html


def test_alignment_errors_say_what_to_fix(built, fixture_dir):
    _, _, man, pred = built
    with pytest.raises(EvaluationError, match="not in the manifest"):
        align(pd.concat([pred, pred.iloc[:1].assign(lesion_id="NOPE")]), man, ISIC2018)
    with pytest.raises(EvaluationError, match="more than once"):
        align(pd.concat([pred, pred.iloc[:2]]), man, ISIC2018)
    with pytest.raises(EvaluationError, match="missing VASC"):
        align(pred.drop(columns="VASC"), man, ISIC2018)
    milk = pred.assign(**{c: 0.0 for c in MILK10K.classes if c not in pred.columns})
    with pytest.raises(EvaluationError, match="not in the task"):
        align(milk, man, ISIC2018)
    with pytest.raises(EvaluationError, match="lesion_id"):
        align(pred.drop(columns="lesion_id"), man, ISIC2018)
    with pytest.raises(EvaluationError, match=r"\[0, 1\]"):
        align(pred.assign(MEL=1.5), man, ISIC2018)
    # predictions for a subset of the manifest are fine, in their own row order
    sub, rows, y, p = align(pred.iloc[::-3], man, ISIC2018)
    assert list(rows["lesion_id"]) == list(sub["lesion_id"]) and len(y) == len(p) == len(sub)


def test_print_summary_renders(built):
    from rich.console import Console

    buf = io.StringIO()
    print_summary(built[1], console=Console(file=buf, width=120))
    text = buf.getvalue()
    assert "Balanced accuracy" in text and "MEL" in text and "subgroup flagged" in text


@pytest.mark.browser
def test_report_opens_cleanly_in_chromium(built, tmp_path):
    if not (shutil.which("chromium") or Path(CHROMIUM).exists()):
        pytest.skip("chromium is not installed (set DERMFUSION_CHROMIUM or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    out = built[0]
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                     args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto((out / "report.html").as_uri(), wait_until="load")
            sizes = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            title = page.title()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    assert len(sizes) == 5 + 12
    assert all(done and width > 0 for done, width, _ in sizes), sizes
    assert all(alt for _, _, alt in sizes)
    assert overflow <= 0, "the report scrolls sideways at 1280 px"
    assert "isic2018" in title
    assert shot.stat().st_size > 10_000
    if os.environ.get("DERMFUSION_ARTIFACTS"):
        dest = Path(__file__).parent / "artifacts"
        dest.mkdir(exist_ok=True)
        shutil.copy(shot, dest / "report.png")
