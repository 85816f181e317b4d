"""The same bundle and lesion give the same numbers through `dermfusion predict` and `/v1/analyze` (issue 29), checked
through the CLI on real images: start `dermfusion serve RUN` on loopback, post N lesions of a manifest, and compare
each answer's posteriors, action and prediction set with the rows `predict --clinical` wrote for them.

    python benchmarks/predict_vs_api.py RUN --manifest test.parquet --clinical clinical.csv [--n 20] [--port 8765]
        [--metadata] [--predictions predictions.csv]

``--metadata`` posts each row's age / sex / site / elevation as the request's metadata (for a model that reads them,
e.g. Derm7pt's); ``--predictions`` also compares a multi-task network's 7-point criteria (the ``<criterion>:<label>``
columns `predict` wrote) with the answer's ``criteria``.

Prints the largest absolute posterior (and criteria) difference and any disagreement; exit 1 if one differs by more
than 1e-6 (the files are written to 6 decimals) or an action / set differs. The service runs with its default service.yaml (the bundle's operating point and
prior, no auth on loopback); `predict` must have used the bundle's defaults too (TTA, backend policy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd

from dermfusion.data.manifest import load_manifest


METADATA = ("age", "sex", "site", "elevation")


def post_image(url: str, path: str, field: str, metadata: dict | None = None) -> dict:
    boundary = "----dermfusion-check"
    data = Path(path).read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{Path(path).name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
    if metadata:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n"
                 f"{json.dumps(metadata)}\r\n").encode()
    body += f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--clinical", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--metadata", action="store_true", help="post each row's age / sex / site / elevation")
    ap.add_argument("--predictions", help="the predictions file of the same run, for the criteria columns")
    a = ap.parse_args()
    man = load_manifest(a.manifest)
    clin = pd.read_csv(a.clinical)
    key = clin.columns[0]
    classes = [c for c in clin.columns[1:] if c not in ("action", "differential")]
    # the clinical file names lesions as `predict` does: whichever manifest column holds those names
    ids = next((man[c].astype(str) for c in ("image_id", "source_image", "lesion_id")
                if c in man.columns and man[c].astype(str).isin(clin[key].astype(str)).any()), None)
    if ids is None:
        raise SystemExit(f"no manifest column holds the clinical file's {key!r} values")
    clin = clin.set_index(clin[key].astype(str))
    pred = None
    if a.predictions:
        pred = pd.read_csv(a.predictions)
        pred = pred.set_index(pred[pred.columns[0]].astype(str))
    rows = man.assign(_key=ids).head(a.n)
    server = subprocess.Popen([sys.executable, "-m", "dermfusion.cli", "serve", a.run, "--port", str(a.port),
                               "--workers", "1", "--log-level", "warning"], env={**os.environ})
    base = f"http://127.0.0.1:{a.port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        worst, worst_crit, bad = 0.0, 0.0, []
        for _, row in rows.iterrows():
            field = "dermoscopic" if isinstance(row.get("image_dermoscopic"), str) else "clinical"
            meta = {k: (float(row[k]) if k == "age" else str(row[k])) for k in METADATA
                    if a.metadata and k in row and pd.notna(row[k]) and str(row[k]) != ""}
            res = post_image(f"{base}/v1/analyze", row[f"image_{field}"], field, meta)
            api = {d["code"]: d["probability"] for d in res["differential"]}
            ref = clin.loc[row["_key"]]
            diff = max(abs(api[c] - float(ref[c])) for c in classes)
            worst = max(worst, diff)
            api_set = sorted((res.get("prediction_set") or {}).get("classes") or [])
            ref_set = sorted(str(ref["differential"]).split("|")) if isinstance(ref.get("differential"), str) else []
            crit_diff = 0.0
            if pred is not None and res["action"] != "cannot_assess":  # nothing is described in an image not assessed
                items = (res.get("criteria") or {}).get("items") or []
                if not items:
                    bad.append((row["_key"], "no criteria in the answer"))
                for item in items:
                    for label, v in item["probabilities"].items():
                        crit_diff = max(crit_diff, abs(v - float(pred.loc[row["_key"], f"{item['criterion']}:{label}"])))
                    if item["label"] != pred.loc[row["_key"], item["criterion"]]:
                        bad.append((row["_key"], item["criterion"], item["label"], pred.loc[row["_key"], item["criterion"]]))
                worst_crit = max(worst_crit, crit_diff)
            if diff > 1e-6 or crit_diff > 1e-6 or res["action"] != ref["action"] or api_set != ref_set:
                bad.append((row["_key"], diff, crit_diff, res["action"], ref["action"], api_set, ref.get("differential")))
        print(f"{len(rows)} lesions: largest posterior difference predict vs /v1/analyze {worst:.2e}"
              + (f"; criteria {worst_crit:.2e}" if pred is not None else "") + f"; {len(bad)} disagreement(s)")
        for b in bad:
            print("  ", b)
        return 1 if bad else 0
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
