"""The local model registry (``bundle.registry``) on fake sealed bundles: semantic versions, no duplicates, the
verified hash and gate verdict recorded, promotion gated, shadow / canary, rollback through the history, atomic
writes; and the A/B statistics (``evaluation.ab_compare``): McNemar's exact p-value against scipy and by hand."""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest

from dermfusion.bundle import seal_bundle
from dermfusion.bundle.registry import Registry, RegistryError, previous_promoted
from dermfusion.evaluation.ab_compare import (binomial_two_sided, mcnemar_exact, min_discordant_for, pairs_needed,
                                              sample_size_note, version_performance)
from dermfusion.tasks import ISIC2018


def gate_record(bundle_hash: str, passed: bool) -> dict:
    """A gate.json as `dermfusion gate` writes it (the fields registration checks): the bundle's hash, the criteria
    judged with their bounds, and a verdict that follows from them."""
    bound = 0.62 if passed else 0.41
    return {"passed": passed, "failed": [] if passed else ["balanced_accuracy_min"], "n": 48,
            "model": {"target": "b", "bundles": [{"path": "b", "hash": bundle_hash, "legacy_format": False}]},
            "criteria": [{"criterion": "balanced_accuracy_min", "kind": "min", "threshold": 0.5, "bound": bound,
                          "status": "pass" if passed else "fail"},
                         {"criterion": "skin_tone_sensitivity_spread_max", "kind": "max", "threshold": 10.0,
                          "bound": None, "status": "skipped"}]}


def fake_bundle(path, seed: int, gate: bool | None = None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"kind: network\ntask: isic2018\nname: fake\nseed: {seed}\n")
    (path / "model.safetensors").write_bytes(bytes([seed]) * 64)
    (path / "calibration.json").write_text("{}")
    (path / "VERSION").write_text("test\n")
    h = seal_bundle(path)
    if gate is not None:
        (path / "gate").mkdir()
        (path / "gate" / "gate.json").write_text(json.dumps(gate_record(h, gate)))
    return h


def test_register_promote_shadow_rollback(tmp_path):
    h1 = fake_bundle(tmp_path / "b1", 1, gate=True)
    fake_bundle(tmp_path / "b2", 2, gate=False)
    fake_bundle(tmp_path / "b3", 3, gate=True)
    fake_bundle(tmp_path / "b4", 4)
    reg = Registry(tmp_path / "reg", create=True)
    e = reg.register(tmp_path / "b1", "1.0.0", by="alice")
    assert e["hash"] == h1 and e["gate"]["passed"] is True and e["registered_by"] == "alice"
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(tmp_path / "b3", "1.0.0")
    for bad in ("1.0", "v1.0.0", "01.2.3", "1.2.3.4"):
        with pytest.raises(RegistryError, match="semantic version"):
            reg.register(tmp_path / "b3", bad)
    reg.register(tmp_path / "b2", "1.1.0")
    reg.register(tmp_path / "b3", "1.2.0-rc.1")
    reg.register(tmp_path / "b4", "2.0.0")
    assert reg.version("1.1.0")["gate"]["failed"] == ["balanced_accuracy_min"]
    assert reg.version("2.0.0")["gate"] is None

    with pytest.raises(RegistryError, match="nothing is promoted"):
        reg.rollback()
    reg.promote("1.0.0", by="alice")
    with pytest.raises(RegistryError, match="failed its release gate"):
        reg.promote("1.1.0")
    with pytest.raises(RegistryError, match="no release-gate record"):
        reg.promote("2.0.0")
    with pytest.raises(RegistryError, match="first promoted version"):
        reg.rollback()
    reg.shadow("1.1.0")  # a failed gate may run in shadow (never returned) …
    with pytest.raises(RegistryError, match="canary"):
        reg.shadow("1.1.0", share=0.2)  # … but not as a canary
    with pytest.raises(RegistryError, match=r"\[0, 1\]"):
        reg.shadow("1.2.0-rc.1", share=1.5)
    s = reg.shadow("1.2.0-rc.1", share=0.25)
    assert s["shadow"] == {"version": "1.2.0-rc.1", "share": 0.25}
    roles = {e["version"]: e["role"] for e in reg.listing()}
    assert roles == {"1.0.0": "promoted", "1.1.0": "", "1.2.0-rc.1": "canary", "2.0.0": ""}
    assert [e["version"] for e in reg.listing()] == ["1.0.0", "1.1.0", "1.2.0-rc.1", "2.0.0"]  # semver order

    reg.promote("1.2.0-rc.1")  # the canary becomes the promoted version: no longer a shadow
    assert reg.read()["shadow"] is None
    with pytest.raises(RegistryError, match="needs a --reason") as e:
        reg.promote("1.1.0", force=True, by="bob")  # an override is recorded with who *and* why
    assert e.value.code == "reason_required"
    reg.promote("1.1.0", force=True, by="bob", reason="clinical lead's sign-off, ticket 42")
    s = reg.rollback(by="carol")
    assert s["promoted"] == "1.2.0-rc.1"
    s = reg.rollback()
    assert s["promoted"] == "1.0.0"
    with pytest.raises(RegistryError, match="first promoted"):
        reg.rollback()
    hist = reg.read()["history"]
    assert [h["action"] for h in hist][-4:] == ["promote", "promote", "rollback", "rollback"]
    assert hist[-4]["forced"] is False and hist[-3]["forced"] is True and hist[-3]["by"] == "bob"
    assert hist[-3]["reason"] == "clinical lead's sign-off, ticket 42" and "reason" not in hist[-4]
    assert hist[-2]["by"] == "carol" and hist[-2]["previous"] == "1.1.0" and all(h["at"] for h in hist)
    assert previous_promoted(hist) is None


def test_a_changed_bundle_cannot_be_registered_and_writes_are_atomic(tmp_path):
    fake_bundle(tmp_path / "b1", 1, gate=True)
    (tmp_path / "b1" / "calibration.json").write_text('{"temperature": 2}')  # tampered after sealing
    reg = Registry(tmp_path / "reg", create=True)
    with pytest.raises(Exception, match="calibration.json"):
        reg.register(tmp_path / "b1", "1.0.0")
    with pytest.raises(RegistryError, match="no model registry"):
        Registry(tmp_path / "nowhere")
    # concurrent writers: every registration lands (lock), and the file is always whole JSON (atomic replace)
    for i in range(8):
        fake_bundle(tmp_path / f"c{i}", 10 + i, gate=True)
    seen_bad = []

    def reader():
        for _ in range(200):
            try:
                reg.read()
            except RegistryError as e:
                seen_bad.append(e)

    threads = [threading.Thread(target=reg.register, args=(tmp_path / f"c{i}", f"0.{i}.0")) for i in range(8)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = reg.read()
    assert len(s["versions"]) == 8 and s["revision"] == 8 and not seen_bad
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".registry-")]  # no temporary left behind


def test_mcnemar_exact_and_the_sample_size_caveat():
    a = np.array([True] * 30 + [True] * 9 + [False] * 2 + [False] * 9)
    b = np.array([True] * 30 + [False] * 9 + [True] * 2 + [False] * 9)
    t = mcnemar_exact(a, b)
    assert (t["a_right_b_wrong"], t["a_wrong_b_right"], t["discordant"], t["n_pairs"]) == (9, 2, 11, 50)
    by_hand = 2 * sum(math.comb(11, i) for i in range(3)) / 2 ** 11   # exact two-sided binomial, p = 1/2
    assert t["p_value"] == pytest.approx(by_hand) == pytest.approx(0.06543, abs=1e-4)
    assert binomial_two_sided(0, 0) == 1.0 and binomial_two_sided(5, 10) == pytest.approx(1.0)
    assert min_discordant_for(0.05) == 6           # 2 / 2^5 = 0.0625, 2 / 2^6 = 0.031
    n = pairs_needed(0.05, 0.10)
    assert 250 < n < 330                           # Connor's formula: ≈ 285 pairs for 5 points at ψ = 10 %
    note = sample_size_note(t)
    assert "50 paired confirmed case(s), 11 discordant" in note and "fewer than 6 discordant pairs" in note
    assert "not evidence of equivalence" in note
    assert "assumed" in sample_size_note(mcnemar_exact([], []))


def test_version_performance():
    classes = list(ISIC2018.classes)
    truth = ["MEL", "MEL", "NV", "NV", "BCC"]
    probs = np.full((5, len(classes)), 0.01)
    for i, c in enumerate(["MEL", "NV", "NV", "NV", "BCC"]):
        probs[i, classes.index(c)] = 0.9
    probs[1, classes.index("MEL")] = 0.5
    referred = np.array([True, False, False, False, True])
    p = version_performance(ISIC2018, truth, probs, referred)
    assert p["n"] == 5 and p["accuracy"] == pytest.approx(0.8)
    assert p["per_class"]["MEL"] == {"n": 2, "sensitivity": 0.5} and p["per_class"]["DF"]["sensitivity"] is None
    assert p["melanoma_sensitivity"] == 0.5 and p["melanoma_n"] == 2
    assert p["auroc"]["MEL"] == pytest.approx(1.0) and p["auroc"]["DF"] is None
    assert version_performance(ISIC2018, [], np.zeros((0, len(classes))), np.zeros(0, bool))["n"] == 0


# ------------------------------------------------------------------------------- issue 32, finding 4: gate records
@pytest.mark.parametrize("record,code", [
    ({"passed": True, "failed": []}, "gate_unbound"),                         # the hand-written verdict of the issue
    ("other_hash", "gate_other_bundle"),                                      # judged another bundle's content
    ("no_criteria", "gate_no_criteria"),                                      # no criteria it was judged on
    ("all_skipped", "gate_no_criteria"),                                      # nothing was judged
    ("edited_verdict", "gate_inconsistent"),                                  # "passed" though its bound fails
    ("edited_status", "gate_inconsistent"),                                   # a criterion flipped to pass
])
def test_register_refuses_a_gate_record_that_does_not_prove_itself(tmp_path, record, code):
    h = fake_bundle(tmp_path / "b", 1)
    (tmp_path / "b" / "gate").mkdir()
    if record == "other_hash":
        record = gate_record("f" * 64, True)
    elif record == "no_criteria":
        record = {**gate_record(h, True), "criteria": []}
    elif record == "all_skipped":
        rec = gate_record(h, True)
        record = {**rec, "criteria": [c for c in rec["criteria"] if c["status"] == "skipped"]}
    elif record == "edited_verdict":
        record = {**gate_record(h, False), "passed": True, "failed": []}
    elif record == "edited_status":
        rec = gate_record(h, False)
        rec["criteria"][0]["status"] = "pass"
        record = {**rec, "passed": True, "failed": []}
    (tmp_path / "b" / "gate" / "gate.json").write_text(json.dumps(record))
    reg = Registry(tmp_path / "reg", create=True)
    with pytest.raises(RegistryError) as e:
        reg.register(tmp_path / "b", "1.0.0")
    assert e.value.code == code, e.value
    assert reg.read()["versions"] == {}  # nothing registered
    # a record that names this bundle's verified hash and its criteria is believed, and kept with its criteria
    (tmp_path / "b" / "gate" / "gate.json").write_text(json.dumps(gate_record(h, True)))
    g = reg.register(tmp_path / "b", "1.0.0")["gate"]
    assert g["passed"] and [c["criterion"] for c in g["criteria"]] == ["balanced_accuracy_min",
                                                                       "skin_tone_sensitivity_spread_max"]
    assert len(g["sha256"]) == 64


# --------------------------------------------------------------------------- issue 32, finding 2: lifecycle rules
def test_full_canary_is_a_promotion_and_rollback_stops_every_shadow(tmp_path):
    for i, gate in enumerate((True, False, True), 1):
        fake_bundle(tmp_path / f"b{i}", i, gate=gate)
    reg = Registry(tmp_path / "reg", create=True)
    for i, v in enumerate(("1.0.0", "1.1.0", "1.2.0"), 1):
        reg.register(tmp_path / f"b{i}", v)
    reg.promote("1.0.0")
    # a canary answering every request is a promotion: the promotion's rules (gate, force + reason), recorded as one
    with pytest.raises(RegistryError, match="failed its release gate"):
        reg.shadow("1.1.0", share=1.0)
    with pytest.raises(RegistryError, match="needs a --reason"):
        reg.shadow("1.1.0", share=1.0, force=True)
    s = reg.shadow("1.1.0", share=1.0, force=True, by="cli:dana", reason="urgent fix for a known failure")
    assert s["promoted"] == "1.1.0" and s["shadow"] is None
    last = s["history"][-1]
    assert (last["action"], last["version"], last["forced"], last["by"], last["reason"], last["via"]) == \
        ("promote", "1.1.0", True, "cli:dana", "urgent fix for a known failure", "canary share 1.0")
    # a forced canary below 1 is recorded as forced, with its reason
    reg.shadow("1.2.0", share=0.3)
    assert reg.read()["history"][-1]["forced"] is False
    # rollback returns to the version promoted before *and* stops the shadow / canary beside the withdrawn one
    s = reg.rollback(by="cli:dana")
    assert s["promoted"] == "1.0.0" and s["shadow"] is None
    assert s["history"][-1]["shadow_stopped"] == "1.2.0"
    reg.shadow("1.1.0", share=0.0)  # a failed gate may still run in shadow (never returned)
    reg.promote("1.2.0")
    assert reg.rollback()["shadow"] is None  # a plain shadow stops too


def test_public_view_names_no_paths_and_no_users(tmp_path):
    fake_bundle(tmp_path / "b1", 1, gate=True)
    reg = Registry(tmp_path / "reg", create=True)
    reg.register(tmp_path / "b1", "1.0.0", by="alice")
    reg.promote("1.0.0", by="api:ops")
    text = json.dumps(reg.public_view())
    assert str(tmp_path) not in text and "alice" not in text and "gate.json" not in text
    view = reg.public_view()
    assert view["versions"][0]["gate"]["criteria"] == ["balanced_accuracy_min", "skin_tone_sensitivity_spread_max"]
    assert [h["by"] for h in view["history"]] == ["operator", "api:ops"]
