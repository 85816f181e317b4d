"""`dermfusion data combine`: another dataset added for training only — relabelled through an explicit map, its
duplicates of the main manifest's images left out, its rows trained on in every fold and never validated — and the
per-dataset reports (model card, evaluation) that follow."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermfusion.cli import app
from dermfusion.data.combine import CombineError, combine, read_label_map, relabel
from dermfusion.data.importers import import_derm7pt
from dermfusion.data.manifest import load_manifest, save_manifest, train_only_mask
from dermfusion.tasks import DERM7PT, ISIC2018

D7_DIAGNOSES = ["clark nevus", "melanoma (in situ)", "basal cell carcinoma", "seborrheic keratosis", "lentigo",
                "dermatofibroma", "vascular lesion", "melanosis", "miscellaneous", "blue nevus"]


def _derm7pt(tmp_path, images: list[str], diagnoses: list[str]) -> pd.DataFrame:
    pd.DataFrame({"case_num": range(1, len(images) + 1), "image": images, "split": "train",
                  "diagnosis": diagnoses}).to_csv(tmp_path / "meta.csv", index=False)
    return import_derm7pt(tmp_path / "meta.csv")


@pytest.fixture(scope="module")
def combined_inputs(tmp_path_factory, ham_sample):
    """Main: the first 32 bundled HAM10000 lesions (2 folds). Added: a Derm7pt-shaped manifest of the other 16
    images plus an identical copy and a re-saved, resized copy of two main images."""
    d = tmp_path_factory.mktemp("combine")
    main, rest = ham_sample.iloc[:32].reset_index(drop=True), ham_sample.iloc[32:].reset_index(drop=True)
    exact = d / "exact.jpg"
    exact.write_bytes(open(main.loc[0, "image_dermoscopic"], "rb").read())
    with Image.open(main.loc[1, "image_dermoscopic"]) as im:
        im.convert("RGB").resize((im.width // 2 + 7, im.height // 2 + 5), Image.BICUBIC).save(d / "near.jpg", quality=70)
    images = [*rest["image_dermoscopic"], str(exact), str(d / "near.jpg")]
    diagnoses = [D7_DIAGNOSES[i % len(D7_DIAGNOSES)] for i in range(len(rest))] + ["clark nevus"] * 2
    return main, _derm7pt(d, images, diagnoses), d


def test_relabel_places_every_value_on_purpose(tmp_path):
    lm = read_label_map("derm7pt_to_isic2018")
    d7 = _derm7pt(tmp_path, [f"i{i}.jpg" for i in range(len(D7_DIAGNOSES))], D7_DIAGNOSES)
    out, rep = relabel(d7, lm)
    assert rep["kept"] == 8 and rep["left_out"] == {"melanosis": 1, "miscellaneous": 1}  # null: left out, counted
    got = dict(zip(out["diagnosis_fine"], out[ISIC2018.label_columns()].to_numpy().argmax(1)))
    assert {k: ISIC2018.classes[v] for k, v in got.items()} == {
        "clark nevus": "NV", "melanoma (in situ)": "MEL", "basal cell carcinoma": "BCC", "seborrheic keratosis": "BKL",
        "lentigo": "BKL", "dermatofibroma": "DF", "vascular lesion": "VASC", "blue nevus": "NV"}
    assert {c for c in out.columns if c.startswith("label_")} == set(ISIC2018.label_columns())  # NEV, SK, MISC gone
    assert (out[ISIC2018.label_columns()].sum(axis=1) == 1).all()
    unplaced = _derm7pt(tmp_path, ["a.jpg", "b.jpg"], ["clark nevus", "pigmented actinic keratosis"])
    with pytest.raises(CombineError, match="pigmented actinic keratosis"):
        relabel(unplaced, lm)


def test_relabel_by_class_and_label_map_checks(tmp_path, ham_sample):
    out, rep = relabel(ham_sample, read_label_map("ham10000_to_derm7pt"))
    assert rep["kept"] == len(ham_sample) and rep["left_out"] == {}
    src = ham_sample[ISIC2018.label_columns()].to_numpy().argmax(1)
    dst = out[DERM7PT.label_columns()].to_numpy().argmax(1)
    expect = {"MEL": "MEL", "NV": "NEV", "BCC": "BCC", "BKL": "SK", "AKIEC": "MISC", "DF": "MISC", "VASC": "MISC"}
    assert [DERM7PT.classes[j] for j in dst] == [expect[ISIC2018.classes[i]] for i in src]
    bad = tmp_path / "bad.yaml"
    bad.write_text("source_task: derm7pt\ntarget_task: isic2018\nby: diagnosis_fine\nmap: {melanoma: MELANOMA}\n")
    with pytest.raises(CombineError, match="MELANOMA"):
        read_label_map(bad)
    with pytest.raises(CombineError, match="derm7pt_to_isic2018"):  # the message names the built-in maps
        read_label_map("no_such_map")


def test_combine_leaves_out_exact_and_near_duplicates(combined_inputs):
    main, d7, _ = combined_inputs
    out, rep = combine(main, d7, read_label_map("derm7pt_to_isic2018"), ISIC2018)
    dupes = dict(rep["duplicates_left_out"])
    assert set(dupes) == set(d7["lesion_id"][-2:]), rep["duplicates_left_out"]  # exactly the two copies
    assert dupes[d7["lesion_id"].iloc[-2]] == "identical file"
    assert dupes[d7["lesion_id"].iloc[-1]].startswith(f"near-identical to {main.loc[1, 'lesion_id']}")
    added = out[train_only_mask(out)]
    left_by_map = sum(rep["relabel"]["left_out"].values())
    assert len(added) == rep["added"] == len(d7) - 2 - left_by_map
    assert (added["fold"] == -1).all() and set(added["dataset"]) == {"derm7pt"}
    assert out.loc[~train_only_mask(out), "fold"].tolist() == main["fold"].tolist()  # the main folds as they were
    counts = rep["class_counts_by_dataset"]
    assert sum(counts["derm7pt"].values()) == len(added) and sum(counts["ham10000_sample"].values()) == len(main)


def test_train_only_rows_train_every_fold_and_are_never_validated(combined_inputs, tmp_path):
    from dermfusion.config import load_config
    from dermfusion.training.cv import parse_folds, train_cv, training_class_counts

    main, d7, _ = combined_inputs
    out, _ = combine(main, d7, read_label_map("derm7pt_to_isic2018"), ISIC2018)
    cfg = load_config("tiny_cpu", ["train.epochs=1", "train.max_steps_per_epoch=1", "train.device=cpu",
                                   "data.cache_dir=null", "data.num_workers=0"])
    assert parse_folds("all", out, cfg) == [0, 1]  # the added rows' fold -1 makes no fold of its own
    extra = out[train_only_mask(out)]
    counts = training_class_counts(out, ISIC2018, [0])
    in_fold_1 = out[(out["fold"] == 1)]
    assert counts.sum() == len(in_fold_1) + len(extra)  # fold 0's model trains on fold 1 and every added row
    train_cv(cfg, out, tmp_path / "run")
    oof = pd.read_csv(tmp_path / "run" / "oof.csv", dtype={"lesion_id": str})
    assert sorted(oof["lesion_id"]) == sorted(main["lesion_id"])  # validated: the main lesions, each once
    assert not set(oof["lesion_id"]) & set(extra["lesion_id"])


def test_combine_cli_and_the_card_counts_per_dataset(combined_inputs, tmp_path):
    from dermfusion.card.render import _by_dataset_blocks
    from dermfusion.card.sections import training_data_section

    main, d7, d = combined_inputs
    m, a = save_manifest(main, tmp_path / "main.parquet"), save_manifest(d7, tmp_path / "d7.parquet")
    res = CliRunner().invoke(app, ["data", "combine", str(m), "--add", str(a), "--label-map", "derm7pt_to_isic2018",
                                   "--out", str(tmp_path / "both.parquet")])
    assert res.exit_code == 0, res.output
    assert "duplicates of the main manifest's images left out: 2" in res.output
    both = load_manifest(tmp_path / "both.parquet")
    assert train_only_mask(both).sum() == len(both) - len(main)
    td = training_data_section(SimpleNamespace(task=ISIC2018, config={"fold": 0}), both)
    by = td["by_dataset"]
    assert set(by) == {"derm7pt", "ham10000_sample"} and by["derm7pt"]["train_only"] and not by["ham10000_sample"]["train_only"]
    assert sum(by["derm7pt"]["class_counts"].values()) == by["derm7pt"]["n_lesions"] == train_only_mask(both).sum()
    assert by["ham10000_sample"]["provenance"]["available"] and not by["derm7pt"]["provenance"]["available"]
    f = both["fold"]
    assert td["this_bundle"] == {"fold": 0, "n_train": int(((f == 1) | train_only_mask(both)).sum()),
                                 "n_validation": int((f == 0).sum())}
    assert json.dumps(td)  # JSON-clean, as model_card.json stores it
    head, rows = _by_dataset_blocks(by)[1][1:]  # the card's "By dataset" table: a column per dataset
    assert head == ["Class", "derm7pt (train only)", "ham10000_sample"]
    assert rows[-1] == ["All", str(by["derm7pt"]["n_lesions"]), str(len(main))]
    one = training_data_section(SimpleNamespace(task=ISIC2018, config={"fold": 0}), main)
    assert "by_dataset" not in one  # a single dataset: nothing to break down
    assert np.isclose(sum(td["class_counts"].values()), len(both))
