"""The concept mapping travels in the bundle and is used wherever scores are computed for it; the audit says which
scores were supplied, which computed (values, scorer, mapping).

A bundle stores the map as concept_mapping.json, covered by its hash; `dermfusion concepts --bundle`,
`dermfusion predict --concept-model` and /v1/analyze put computed scores on that scale. An older bundle without the
file keeps working on raw scores (or the service config's mapping)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from clip_fixtures import save_open_clip_dir, tiny_clip_model
from typer.testing import CliRunner

from dermfusion.bundle import BundleIntegrityError, verify_bundle
from dermfusion.bundle.concept_mapping import CONCEPT_MAPPING_FILE, find_concept_mapping
from dermfusion.concepts import ConceptMapping, ConceptMappingError, load_concept_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = load_concept_set().names
COLS = [f"concept_dermoscopic_{c}" for c in NAMES]
# an easy map to recognise: every computed score lands in [0.9, 1.0]
SQUEEZE = ConceptMapping({c: ([0.0, 1.0], [0.9, 1.0]) for c in NAMES}, "isotonic")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_open_clip_dir(tiny_clip_model(), tmp_path_factory.mktemp("tiny_clip_map"))


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory, ham_sample):
    """tiny_cpu trained (1 epoch, fold 0) with supplied MILK10k-style concept scores; no concept_mapping.json."""
    from service_fixtures import build_concept_bundle

    return build_concept_bundle(tmp_path_factory.mktemp("concept_map_run") / "run", ham_sample, COLS)


@pytest.fixture(scope="module")
def mapped_bundle(old_bundle, tmp_path_factory):
    """The same bundle with SQUEEZE stored by `dermfusion bundle concept-mapping`."""
    b = tmp_path_factory.mktemp("mapped") / "bundle"
    shutil.copytree(old_bundle, b)
    f = SQUEEZE.save(tmp_path_factory.mktemp("map") / "squeeze.json")
    out = run("bundle", "concept-mapping", b, f)
    assert "re-sealed" in out
    return b


def run(*args, code=0):
    from dermfusion.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return " ".join(res.output.split())


def test_the_mapping_is_sealed_into_the_bundle(mapped_bundle, old_bundle, tmp_path):
    assert verify_bundle(mapped_bundle).hash != verify_bundle(old_bundle).hash  # the file changes answers: hashed
    assert CONCEPT_MAPPING_FILE in (mapped_bundle / "SHA256SUMS").read_text()
    assert find_concept_mapping([mapped_bundle]) == mapped_bundle / CONCEPT_MAPPING_FILE
    assert find_concept_mapping([old_bundle]) is None
    assert ConceptMapping.load(mapped_bundle / CONCEPT_MAPPING_FILE).knots == SQUEEZE.knots
    tampered = tmp_path / "tampered"
    shutil.copytree(mapped_bundle, tampered)
    (tampered / CONCEPT_MAPPING_FILE).write_text(ConceptMapping({"hair": ([0, 1], [0, 0.1])}).to_json())
    with pytest.raises(BundleIntegrityError, match=CONCEPT_MAPPING_FILE):
        verify_bundle(tampered)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"knots": {"hair": {"x": [0, 1], "y": [1, 0]}}}))
    assert "not monotone" in run("bundle", "concept-mapping", tampered, bad, code=2)


def test_predict_computes_concepts_on_the_bundles_scale(mapped_bundle, old_bundle, clip_dir, ham_sample, tmp_path):
    from dermfusion.data.manifest import save_manifest

    bare = save_manifest(ham_sample.head(6), tmp_path / "new.parquet")
    raw, mapped = tmp_path / "raw.parquet", tmp_path / "mapped.parquet"
    run("concepts", f"open_clip:{clip_dir}", "--manifest", bare, "--out", raw, "--no-cache")
    assert "mapping: " in run("concepts", f"open_clip:{clip_dir}", "--manifest", bare, "--out", mapped, "--no-cache",
                              "--bundle", mapped_bundle)
    r, m = pd.read_parquet(raw)[COLS].to_numpy(), pd.read_parquet(mapped)[COLS].to_numpy()
    np.testing.assert_allclose(m, 0.9 + 0.1 * r, atol=1e-9)  # the bundle's map, applied
    out = run("predict", mapped_bundle, "--manifest", bare, "--out", tmp_path / "p.csv", "--backend", "fp32",
              "--concept-model", f"open_clip:{clip_dir}")
    assert "0 supplied, 42 computed" in out and CONCEPT_MAPPING_FILE in out
    run("predict", mapped_bundle, "--manifest", mapped, "--out", tmp_path / "p_ref.csv", "--backend", "fp32")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "p_ref.csv"))
    # an older bundle without the file: raw scores, and it says so
    out = run("predict", old_bundle, "--manifest", bare, "--out", tmp_path / "p_old.csv", "--backend", "fp32",
              "--concept-model", f"open_clip:{clip_dir}")
    assert "none in the bundle (raw scores)" in out


def _service(bundle, tmp_path, **concepts):
    from dermfusion.service.config import load_service_config

    base = {"audit": {"db_url": f"sqlite:///{tmp_path}/audit.db"}, "quality": {"enabled": False}}
    return load_service_config(None, env={}, **base, concepts={"cache_dir": str(tmp_path / "cache"), **concepts})


def test_analyze_uses_the_bundles_mapping_and_audits_the_computed_scores(mapped_bundle, old_bundle, clip_dir,
                                                                          fixture_dir, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermfusion.service.app import create_app

    image = sorted((fixture_dir / "images").glob("*.jpg"))[0].read_bytes()
    files = {"dermoscopic": ("a.jpg", image, "image/jpeg")}
    meta = {"metadata": json.dumps({"concepts": {"dermoscopic": {"hair": 0.3}}})}
    with TestClient(create_app(mapped_bundle, _service(mapped_bundle, tmp_path, model=f"open_clip:{clip_dir}"),
                               warmup=False)) as c:
        r = c.post("/v1/analyze?explain=false", files=files, data=meta)
        assert r.status_code == 200, r.text[:500]
        row = c.app.state.svc.audit.get(r.json()["request_id"])
    audit = row["concepts"]
    assert audit["supplied"] == ["concept_dermoscopic_hair"]
    assert sorted(audit["computed"]) == sorted(set(COLS) - {"concept_dermoscopic_hair"})
    for col, value in audit["computed"].items():  # the value the model saw = the bundle's map of the raw score
        assert value == pytest.approx(0.9 + 0.1 * audit["computed_raw"][col])
    assert audit["mapping"]["source"] == "bundle" and len(audit["mapping"]["sha256"]) == 64
    assert audit["scorer"]["model"] == f"open_clip:{clip_dir}" and len(audit["scorer"]["weights_sha256"]) == 12
    assert sorted(r.json()["inputs"]["concepts_computed"]) == sorted(audit["computed"])

    # an older bundle: raw scores, no mapping — or the service config's, which then says so
    with TestClient(create_app(old_bundle, _service(old_bundle, tmp_path / "a", model=f"open_clip:{clip_dir}"),
                               warmup=False)) as c:
        row = c.app.state.svc.audit.get(c.post("/v1/analyze?explain=false", files=files).json()["request_id"])
    assert row["concepts"]["mapping"] is None
    assert row["concepts"]["computed"] == row["concepts"]["computed_raw"]
    own = SQUEEZE.save(tmp_path / "own.json")
    with TestClient(create_app(old_bundle, _service(old_bundle, tmp_path / "b", model=f"open_clip:{clip_dir}",
                                                    mapping=str(own)), warmup=False)) as c:
        row = c.app.state.svc.audit.get(c.post("/v1/analyze?explain=false", files=files).json()["request_id"])
    assert row["concepts"]["mapping"]["source"] == "service config"
    # a bundle with its own mapping and a different one in the service config: the service does not start
    other = ConceptMapping({"hair": ([0.0, 1.0], [0.0, 0.5])}).save(tmp_path / "other.json")
    app = create_app(mapped_bundle, _service(mapped_bundle, tmp_path / "c", model=f"open_clip:{clip_dir}",
                                             mapping=str(other)), warmup=False)
    with pytest.raises(ConceptMappingError, match="remove concepts.mapping"):
        with TestClient(app):
            pass
    assert app.state.svc.ready is False


def test_a_mapping_fitted_for_another_scorer_is_flagged(clip_dir, tmp_path):
    from dermfusion.concepts import load_scorer

    scorer = load_scorer(f"open_clip:{clip_dir}", use_cache=False)
    fitted = ConceptMapping({"hair": ([0.0, 1.0], [0.0, 1.0])}, scorer=scorer.identity)
    assert fitted.fitted_for_another(scorer.identity) is None
    other = dict(scorer.identity, weights_sha256="0" * 12)
    assert "differs in weights" in fitted.fitted_for_another(other)
    assert ConceptMapping.load(fitted.save(tmp_path / "m.json")).scorer == scorer.identity
    assert ConceptMapping({"hair": ([0.0, 1.0], [0.0, 1.0])}).fitted_for_another(other) is None  # older maps: unknown
