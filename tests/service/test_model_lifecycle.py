"""The model's life in a clinic, end to end (README "Model lifecycle"): two tiny bundles gated (one passes lenient
criteria, one fails strict ones), registered, v1 promoted and v2 in shadow, requests answered and audited with
the answering version, confirmed diagnoses attached (HTTP and CLI), the A/B comparison read (HTTP and CLI),
promotion refused on a failed gate, forced (with the CLI only, with a reason), picked up from the CLI without restart,
rolled back. One named key per role (analyze, feedback, admin: docs/SERVICE.md "Roles"; the role matrix itself is
tests/service/test_access_roles.py). Then a rollback under load on a real uvicorn server: no request dropped, no
version mixed within a request. And the new audit tables on PostgreSQL."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_helpers import squash
from service_fixtures import ServerThread, postgres_url, tiny_bundle  # noqa: F401

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from dermfusion.bundle import update_calibration  # noqa: E402
from dermfusion.cli import app as cli  # noqa: E402
from dermfusion.data.manifest import IMAGE_COLUMNS, targets  # noqa: E402
from dermfusion.service.app import create_app  # noqa: E402
from dermfusion.service.audit import AuditStore  # noqa: E402
from dermfusion.service.auth import hash_key, new_key  # noqa: E402
from dermfusion.service.config import load_service_config  # noqa: E402
from dermfusion.tasks import ISIC2018  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SECRETS = {"clinic": ("analyze", new_key()), "pathology": ("feedback", new_key()), "ops": ("admin", new_key())}
H, FB, ADM = ({"X-API-Key": SECRETS[k][1]} for k in ("clinic", "pathology", "ops"))  # one key per role
LENIENT = {"balanced_accuracy_min": 0.0, "melanoma_sensitivity_min": 0.0, "calibration_error_max": 1.0,
           "bootstrap": 50}
STRICT = {**LENIENT, "balanced_accuracy_min": 0.99}


def run(*args, code: int = 0) -> str:
    """The command's output, whitespace squashed (wrapping never decides an assertion)."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == code, f"exit {res.exit_code}\n{res.output}"
    return squash(res.output)


def config(tmp: Path, registry: Path | None, **over):
    keys = [{"id": k, "scopes": [scope], "hash": hash_key(secret)} for k, (scope, secret) in SECRETS.items()]
    base = {"audit": {"db_url": f"sqlite:///{tmp}/audit.db"}, "auth": {"keys": keys}, "backend": "fp32",
            "drift": {"window": 50, "min_samples": 1}, "workers": {"workers": 2, "queue_size": 16},
            "rate_limits": {"analyses_per_minute": 0, "requests_per_minute": 0}}
    if registry is not None:
        base["registry"] = {"dir": str(registry), "poll_s": 0.2}
    base.update(over)
    return load_service_config(None, env={}, **base)


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_bundle, ham_manifest):
    """Two gated bundles: v1 (the session's tiny trained bundle) passes lenient criteria; v2 (the same weights with
    a prior shift towards melanoma, re-sealed: another content hash, other answers) fails strict ones."""
    root = tmp_path_factory.mktemp("lifecycle")
    v1 = shutil.copytree(tiny_bundle, root / "v1", ignore=shutil.ignore_patterns("gate"))
    v2 = shutil.copytree(tiny_bundle, root / "v2", ignore=shutil.ignore_patterns("gate"))
    cal = json.loads((v2 / "calibration.json").read_text() or "{}")
    cal["prior_adjustment"] = [1.5 if c == "MEL" else (-1.0 if c == "NV" else 0.0) for c in ISIC2018.classes]
    update_calibration(v2, cal)
    (root / "lenient.yaml").write_text(json.dumps(LENIENT))
    (root / "strict.yaml").write_text(json.dumps(STRICT))
    out = run("gate", v1, "--manifest", ham_manifest, "--criteria", root / "lenient.yaml")
    assert "RELEASE GATE PASSED" in out and "Balanced accuracy" in out
    out = run("gate", v2, "--manifest", ham_manifest, "--criteria", root / "strict.yaml", code=1)
    assert "RELEASE GATE FAILED" in out and "FAIL" in out  # the readable table names the failing criterion
    hashes = {"1.0.0": (v1 / "HASH").read_text().strip(), "1.1.0": (v2 / "HASH").read_text().strip()}
    assert hashes["1.0.0"] != hashes["1.1.0"]
    return root, v1, v2, hashes


def cases(ham_sample, n: int):
    """(image bytes, confirmed diagnosis) of the fixture's first n lesions."""
    y = targets(ham_sample, ISIC2018).argmax(1)
    return [(Path(ham_sample[IMAGE_COLUMNS["dermoscopic"]].iloc[i]).read_bytes(), ISIC2018.classes[int(y[i])])
            for i in range(n)]


def analyze(client, data: bytes, rid: str):
    r = client.post("/v1/analyze?explain=false", headers={**H, "X-Request-ID": rid},
                    files={"dermoscopic": ("l.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_version(client, data: bytes, version: str, prefix: str, timeout: float = 15.0,
                     role: str | None = None) -> dict:
    """Analyse until ``version`` answers (in ``role``, when given) — a CLI change reaches the running service by
    polling registry.json."""
    deadline, i = time.time() + timeout, 0
    while time.time() < deadline:
        body = analyze(client, data, f"{prefix}-{i:04d}")
        if body["model"]["registry_version"] == version and role in (None, body["model"]["role"]):
            return body
        i += 1
        time.sleep(0.1)
    raise AssertionError(f"version {version} did not answer within {timeout} s")


def test_model_lifecycle_end_to_end(tmp_path, versions, ham_sample):
    root, v1, v2, hashes = versions
    reg = tmp_path / "registry"
    # register: the verified hash and the gate's verdict are recorded; a version is never reused
    assert "gate PASSED" in run("registry", "register", v1, "--version", "1.0.0", "--registry", reg)
    assert "gate FAILED (balanced_accuracy_min)" in run("registry", "register", v2, "--version", "1.1.0",
                                                        "--registry", reg)
    assert "already registered" in run("registry", "register", v2, "--version", "1.0.0", "--registry", reg, code=2)
    assert "not a semantic version" in run("registry", "register", v2, "--version", "1.1", "--registry", reg, code=2)
    listing = run("registry", "list", "--registry", reg)
    assert "1.0.0" in listing and "1.1.0" in listing and "PASS" in listing and "FAIL" in listing
    # promotion needs a passed gate; a shadow does not (it is never returned)
    assert "failed its release gate" in run("registry", "promote", "1.1.0", "--registry", reg, code=2)
    assert "promoted: 1.0.0" in run("registry", "promote", "1.0.0", "--registry", reg)
    assert "1.1.0 as shadow" in run("registry", "shadow", "1.1.0", "--registry", reg)

    url = f"sqlite:///{tmp_path}/audit.db"
    sample = cases(ham_sample, 16)
    with TestClient(create_app(None, config(tmp_path, reg))) as client:
        info = client.get("/v1/model", headers=H).json()
        assert info["model"]["hash"] == hashes["1.0.0"]
        rids = []
        for i, (data, _) in enumerate(sample):
            body = analyze(client, data, f"case-{i:04d}")
            assert body["model"]["registry_version"] == "1.0.0" and body["model"]["role"] == "promoted"
            assert body["model"]["hash"] == hashes["1.0.0"]
            rids.append(body["request_id"])
        store = AuditStore(url)
        for rid in rids:  # every audit row names the version that answered; the shadow's prediction is audited too
            row = store.get(rid)
            assert (row["registry_version"], row["model_role"], row["model_hash"]) == \
                ("1.0.0", "promoted", hashes["1.0.0"])

        # clinicians confirm diagnoses: half over HTTP, half with the CLI; enumerated values only
        for i, (rid, (_, dx)) in enumerate(zip(rids, sample)):
            if i % 2 == 0:
                r = client.post("/v1/feedback", headers=FB,
                                json={"request_id": rid, "diagnosis": dx, "confirmation": "histology"})
                assert r.status_code == 201, r.text
                assert r.json()["diagnosis"] == dx
            else:
                assert "recorded" in run("feedback", url, rid, "--diagnosis", dx, "--confirmation", "follow_up")
        bad = [({"request_id": rids[0], "diagnosis": "XYZ", "confirmation": "histology"}, 422),
               ({"request_id": rids[0], "diagnosis": "MEL", "confirmation": "biopsy"}, 422),
               ({"request_id": rids[0], "diagnosis": "MEL", "confirmation": "histology", "note": "free text"}, 422),
               ({"request_id": "never-analysed-0001", "diagnosis": "MEL", "confirmation": "histology"}, 404)]
        for payload, status in bad:
            assert client.post("/v1/feedback", headers=FB, json=payload).status_code == status, payload
        assert client.post("/v1/feedback", json=bad[0][0]).status_code == 401
        assert client.post("/v1/feedback", headers=H, json=bad[0][0]).status_code == 403  # the clinic's key: no
        assert "must be one of MEL" in run("feedback", url, rids[0], "--diagnosis", "XYZ", "--confirmation",
                                           "histology", code=2)

        # the performance report and the A/B comparison on the same cases
        r = client.get("/v1/performance", headers=ADM)
        assert r.status_code == 200, r.text
        rep = r.json()
        assert rep["confirmed_cases"] == 16 and rep["version_a"] == "1.0.0" and rep["version_b"] == "1.1.0"
        for v in ("1.0.0", "1.1.0"):
            p = rep["versions"][v]
            assert p["n"] == 16 and set(p["per_class"]) == set(ISIC2018.classes) and "MEL" in p["auroc"]
            assert 0 <= p["accuracy"] <= 1
            assert (p["melanoma_sensitivity"] is not None) == any(dx == "MEL" for _, dx in sample)
        comp = rep["comparison"]
        t = comp["mcnemar"]
        assert comp["n_pairs"] == t["n_pairs"] == 16 and 0 < t["p_value"] <= 1
        assert t["accuracy_a"] == pytest.approx(rep["versions"]["1.0.0"]["accuracy"])
        assert "discordant" in comp["note"] and "paired confirmed cases" in comp["note"]
        out = run("performance", "--audit-db", url, "--registry", reg, "--json", tmp_path / "perf.json")
        assert "A/B 1.0.0 vs 1.1.0 on 16 same cases" in out and "McNemar exact p =" in out
        assert json.loads((tmp_path / "perf.json").read_text())["comparison"]["mcnemar"] == t

        # admin endpoints: the admin key, a passed gate, effective when they return; nothing forced over HTTP
        data = sample[0][0]
        assert client.post("/v1/admin/promote", json={"version": "1.1.0"}).status_code == 401
        assert client.post("/v1/admin/promote", headers=H, json={"version": "1.1.0"}).status_code == 403
        r = client.post("/v1/admin/promote", headers=ADM, json={"version": "1.1.0"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "gate_failed", r.text
        assert "1.1.0" not in r.text  # a refusal names the rule, never the version asked for
        r = client.post("/v1/admin/promote", headers=ADM, json={"version": "1.1.0", "force": True})
        assert r.status_code == 422 and "not available over HTTP" in r.text
        # a forced promotion is the CLI's, with a reason; the service follows; the admin key rolls it back
        assert "needs a --reason" in run("registry", "promote", "1.1.0", "--force", "--registry", reg, code=2)
        run("registry", "promote", "1.1.0", "--force", "--reason", "test override", "--registry", reg)
        assert wait_for_version(client, data, "1.1.0", "admin")["model"]["hash"] == hashes["1.1.0"]
        r = client.post("/v1/admin/rollback", headers=ADM)
        assert r.status_code == 200 and r.json()["serving"]["promoted"] == "1.0.0"
        assert analyze(client, data, "after-admin-rollback")["model"]["registry_version"] == "1.0.0"
        # a canary answers its share; the promoted version's prediction is audited, not returned (forced: CLI)
        r = client.post("/v1/admin/shadow", headers=ADM, json={"version": "1.1.0", "share": 0.5})
        assert r.status_code == 409 and r.json()["error"]["code"] == "gate_failed"
        run("registry", "shadow", "1.1.0", "--share", "0.5", "--force", "--reason", "canary test", "--registry", reg)
        body = wait_for_version(client, data, "1.1.0", "canary", role="canary")
        assert store.get(body["request_id"])["model_role"] == "canary"
        # a forced 100 % canary is a promotion; after a rollback the promoted version answers and no canary is left
        run("registry", "shadow", "1.1.0", "--share", "1.0", "--force", "--reason", "full canary", "--registry", reg)
        wait_for_version(client, data, "1.1.0", "full-canary", role="promoted")  # the canary before it was 1.1.0 too
        r = client.post("/v1/admin/rollback", headers=ADM)
        assert r.status_code == 200 and r.json()["serving"] == {"promoted": "1.0.0", "shadow": None, "share": 0.0}
        for i in range(4):
            assert analyze(client, data, f"after-rollback-{i:04d}")["model"]["registry_version"] == "1.0.0"
        assert client.post("/v1/admin/shadow", headers=ADM, json={"version": "1.1.0", "share": 0.0}).status_code == 200

        # the CLI changes the registry; the running service follows within seconds, no restart
        run("registry", "promote", "1.1.0", "--force", "--reason", "test", "--registry", reg)
        wait_for_version(client, data, "1.1.0", "cli-promote")
        assert "promoted: 1.0.0" in run("registry", "rollback", "--registry", reg)
        wait_for_version(client, data, "1.0.0", "cli-rollback")
        hist = json.loads((reg / "registry.json").read_text())["history"]
        assert [h["action"] for h in hist][-2:] == ["promote", "rollback"]
        assert any(h["by"] == "api:ops" for h in hist)  # who: the admin key's id, or the operator
        assert all(h.get("reason") for h in hist if h.get("forced"))  # every forced change says why
        store.close()


def test_rollback_under_load_drops_nothing_and_mixes_no_versions(tmp_path, versions, ham_sample, ham_manifest):
    root, v1, v2, hashes = versions
    # the admin endpoints force nothing: the version swapped in is v2's content gated on lenient criteria (passes)
    v3 = shutil.copytree(v2, tmp_path / "v3", ignore=shutil.ignore_patterns("gate"))
    assert "RELEASE GATE PASSED" in run("gate", v3, "--manifest", ham_manifest, "--criteria", root / "lenient.yaml")
    hashes = {**hashes, "1.2.0": hashes["1.1.0"]}
    reg = tmp_path / "registry"
    run("registry", "register", v1, "--version", "1.0.0", "--registry", reg)
    run("registry", "register", v3, "--version", "1.2.0", "--registry", reg)
    run("registry", "promote", "1.0.0", "--registry", reg)
    run("registry", "shadow", "1.2.0", "--registry", reg)
    sample = [d for d, _ in cases(ham_sample, 8)]
    results, errors, swaps = [], [], []
    done = threading.Event()
    with ServerThread(create_app(None, config(tmp_path, reg))) as srv:
        def client_thread(k: int):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                for j in range(13):
                    rid = f"load-{k}-{j:03d}"
                    try:
                        r = c.post("/v1/analyze?explain=false", headers={**H, "X-Request-ID": rid},
                                   files={"dermoscopic": ("l.jpg", sample[(k + j) % 8], "image/jpeg")})
                        results.append((rid, r.status_code, r.json()))
                    except httpx.HTTPError as e:
                        errors.append((rid, repr(e)))

        def toggler():
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                while not done.is_set():
                    r = c.post("/v1/admin/promote", headers=ADM, json={"version": "1.2.0"})
                    swaps.append(r.status_code)
                    time.sleep(0.05)
                    swaps.append(c.post("/v1/admin/rollback", headers=ADM).status_code)
                    time.sleep(0.05)

        clients = [threading.Thread(target=client_thread, args=(k,)) for k in range(8)]
        tog = threading.Thread(target=toggler)
        tog.start()
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=300)
        done.set()
        tog.join(timeout=60)
    assert not errors, errors[:3]
    assert len(results) == 104 and all(s == 200 for _, s, _ in results), [(r, s) for r, s, _ in results if s != 200]
    assert len(swaps) >= 4 and set(swaps) == {200}, swaps
    store = AuditStore(f"sqlite:///{tmp_path}/audit.db")
    answered = set()
    for rid, _, body in results:
        v = body["model"]["registry_version"]
        answered.add(v)
        assert body["model"]["hash"] == hashes[v]  # the version named is the model that answered
        assert all(m["hash"] == hashes[v] for m in body["model"]["members"])
        row = store.get(rid)
        assert (row["registry_version"], row["model_hash"]) == (v, hashes[v]), rid
    assert answered == {"1.0.0", "1.2.0"}, answered  # the swaps happened while requests were answered
    store.close()


def test_lifecycle_tables_on_postgres(postgres_url):
    store = AuditStore(postgres_url)
    base = {"model_name": "m", "model_version": "x", "model_hash": "a" * 64, "task": "isic2018", "input_hashes": {},
            "input_stats": {}, "patient_metadata": {}, "outputs": {c: 1 / 7 for c in ISIC2018.classes},
            "primary_class": "MEL", "top_probability": 0.3, "risk_score": 40.0, "action": "urgent_referral",
            "review_recommended": False, "review_reasons": [], "warnings": [], "latency_ms": 1.0}
    store.write({**base, "request_id": "pg-lifecycle-1", "registry_version": "1.0.0", "model_role": "promoted"})
    store.write_shadow({**base, "request_id": "pg-lifecycle-1", "registry_version": "1.1.0", "model_role": "shadow",
                        "model_hash": "b" * 64})
    store.write_feedback("pg-lifecycle-1", "MEL", "histology", "cli:test")
    (case,) = [c for c in store.confirmed_cases() if c["row"]["request_id"] == "pg-lifecycle-1"]
    assert case["row"]["registry_version"] == "1.0.0" and case["diagnosis"] == "MEL"
    assert [s["registry_version"] for s in case["shadows"]] == ["1.1.0"]
    store.close()
