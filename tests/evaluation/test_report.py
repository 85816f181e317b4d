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


def _open_in_chromium(html: Path, shot: Path) -> dict:
    """Load a report in headless Chromium: console/page/request errors, images, sideways overflow, title."""
    if not (shutil.which("chromium") or Path(CHROMIUM).exists()):
        pytest.skip("chromium is not installed (set DERMFUSION_CHROMIUM or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                     args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(html.resolve().as_uri(), wait_until="load")
            res = {"images": page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"),
                   "overflow": page.evaluate("document.documentElement.scrollWidth - "
                                             "document.documentElement.clientWidth"),
                   "title": page.title()}
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    res["problems"] = problems
    return res


def _check_rendered(res: dict, shot: Path, n_images: int, task: str) -> None:
    assert not res["problems"], res["problems"]
    assert len(res["images"]) == n_images
    assert all(done and width > 0 for done, width, _ in res["images"]), res["images"]
    assert all(alt for _, _, alt in res["images"])
    assert res["overflow"] <= 0, "the report scrolls sideways at 1280 px"
    assert task in res["title"]
    assert shot.stat().st_size > 10_000


@pytest.mark.browser
def test_report_opens_cleanly_in_chromium(built, tmp_path):
    shot = tmp_path / "report.png"
    _check_rendered(_open_in_chromium(built[0] / "report.html", shot), shot, 5 + 12, "isic2018")
    if os.environ.get("DERMFUSION_ARTIFACTS"):
        dest = Path(__file__).resolve().parents[1] / "artifacts"  # tests/artifacts
        dest.mkdir(exist_ok=True)
        shutil.copy(shot, dest / "report.png")


@pytest.mark.browser
@pytest.mark.skipif(not os.environ.get("DERMFUSION_REPORT"), reason="set DERMFUSION_REPORT=DIR (an evaluate --out "
                                                                    "folder) to check a real report")
def test_a_real_report_opens_cleanly_in_chromium(tmp_path):
    """DERMFUSION_REPORT=runs/ham_cpu/report python -m pytest tests/test_report.py -k real_report
    (the HAM10000 out-of-fold report); the screenshot lands next to the report."""
    out = Path(os.environ["DERMFUSION_REPORT"])
    metrics = json.loads((out / "metrics.json").read_text())
    for f in metrics["figures"]:
        assert f["title"].strip() and f["xlabel"].strip() and f["ylabel"].strip(), f
    shot = out / "report_chromium.png"
    n_errors = (out / "report.html").read_text().count("data:image/jpeg;base64,")
    _check_rendered(_open_in_chromium(out / "report.html", shot), shot, len(metrics["figures"]) + n_errors,
                    metrics.get("task", ""))


def test_fairness_slices_api(built):
    from dermfusion.evaluation.fairness import fairness_slices

    _, _, man, pred = built
    y = man[[f"label_{c}" for c in ISIC2018.classes]].to_numpy(float)
    p = pred[list(ISIC2018.classes)].to_numpy(float)
    df = fairness_slices(ISIC2018, man, y, p)
    assert {"attribute", "group", "n", "n_malignant", "balanced_accuracy", "macro_f1", "malignant_sensitivity",
            "melanoma_sensitivity", "malignant_auroc", "status", "reason"} <= set(df.columns)
    assert set(df["attribute"]) == {"all", "skin_tone", "sex", "age", "site"}
    for attr in ("skin_tone", "sex", "age", "site"):  # every lesion lands in exactly one group per attribute
        assert df.loc[df["attribute"] == attr, "n"].sum() == N
    whole = df.iloc[0]
    tone5 = df[(df["attribute"] == "skin_tone") & (df["group"] == "tone 5")].iloc[0]
    assert tone5["malignant_auroc"] < whole["malignant_auroc"]  # the hidden failure also shows in ranking
    # a huge margin flags nothing; a huge min_count marks everything too small (and flags nothing)
    assert (fairness_slices(ISIC2018, man, y, p, margin=1.0)["status"] != "flagged").all()
    big = fairness_slices(ISIC2018, man, y, p, min_count=10_000)
    assert set(big["status"][1:]) == {"too small"}


def test_unlabelled_rows_do_not_count(fixture_dir, tmp_path):
    man, pred = _synthetic(fixture_dir, n=80, seed=1)
    man.loc[:9, [f"label_{c}" for c in ISIC2018.classes]] = np.nan  # 10 lesions without ground truth
    extra = man.iloc[:5].assign(lesion_id=[f"X{i}" for i in range(5)])
    extra.loc[:, [f"label_{c}" for c in ISIC2018.classes]] = np.eye(7)[[0, 1, 2, 3, 4]]
    man = pd.concat([man, extra], ignore_index=True)  # 5 labelled lesions nobody predicted
    m = evaluate_predictions(pred, man, ISIC2018, tmp_path, n_bootstrap=0)
    assert m["n"] == 70 and m["n_predictions_without_label"] == 10 and m["n_manifest_without_prediction"] == 5
    html = (tmp_path / "report.html").read_text()
    assert "10 predictions without a label left out" in html and "How to read this report" in html
    man.loc[:, [f"label_{c}" for c in ISIC2018.classes]] = np.nan
    with pytest.raises(EvaluationError, match="has a label"):
        evaluate_predictions(pred, man, ISIC2018, tmp_path, n_bootstrap=0)


def test_reliability_figure_has_a_labelled_count_histogram(built):
    _, metrics, _, _ = built
    rel = metrics["reliability"]
    assert sum(rel["count"]) == N
    fig = F.reliability_figure(rel, 0.1)
    assert fig.title and fig.xlabel and fig.ylabel
    f, ax = F._new()
    ax.set(title="t", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="panel 0"):
        F._render("bad", f, ax, panels=(ax.twinx(),))
