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


def fake_bundle(path, seed: int, gate: bool | None = None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"kind: network\ntask: isic2018\nname: fake\nseed: {seed}\n")
    (path / "model.safetensors").write_bytes(bytes([seed]) * 64)
    (path / "calibration.json").write_text("{}")
    (path / "VERSION").write_text("test\n")
    h = seal_bundle(path)
    if gate is not None:
        (path / "gate").mkdir()
        (path / "gate" / "gate.json").write_text(json.dumps({"passed": gate, "failed": [] if gate else
                                                             ["balanced_accuracy_min"], "n": 48}))
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
    reg.promote("1.1.0", force=True, by="bob")
    s = reg.rollback(by="carol")
    assert s["promoted"] == "1.2.0-rc.1"
    s = reg.rollback()
    assert s["promoted"] == "1.0.0"
    with pytest.raises(RegistryError, match="first promoted"):
        reg.rollback()
    hist = reg.read()["history"]
    assert [h["action"] for h in hist][-4:] == ["promote", "promote", "rollback", "rollback"]
    assert hist[-4]["forced"] is False and hist[-3]["forced"] is True and hist[-3]["by"] == "bob"
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
