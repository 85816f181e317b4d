"""The same bundle and lesion give the same numbers through `dermfusion predict` and `/v1/analyze` (issue 29), checked
through the CLI on real images: start `dermfusion serve RUN` on loopback, post N lesions of a manifest, and compare
each answer's posteriors, action and prediction set with the rows `predict --clinical` wrote for them.

    python benchmarks/predict_vs_api.py RUN --manifest test.parquet --clinical clinical.csv [--n 20] [--port 8765]

Prints the largest absolute posterior difference and any disagreement; exit 1 if a posterior differs by more than
1e-6 (the clinical file is written to 6 decimals) or an action / set differs. The service runs with its default service.yaml (the bundle's operating point and
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


def post_image(url: str, path: str, field: str) -> dict:
    boundary = "----dermfusion-check"
    data = Path(path).read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{Path(path).name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
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
    a = ap.parse_args()
    man = load_manifest(a.manifest)
    clin = pd.read_csv(a.clinical)
    key = "image" if "image" in clin.columns else "lesion_id"
    clin = clin.set_index(key)
    classes = [c for c in clin.columns if c not in ("action", "differential")]
    ids = man["image_id"] if key == "image" and "image_id" in man.columns else man["lesion_id"]
    rows = man.assign(_key=ids.astype(str)).head(a.n)
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
        worst, bad = 0.0, []
        for _, row in rows.iterrows():
            field = "dermoscopic" if isinstance(row.get("image_dermoscopic"), str) else "clinical"
            res = post_image(f"{base}/v1/analyze", row[f"image_{field}"], field)
            api = {d["code"]: d["probability"] for d in res["differential"]}
            ref = clin.loc[row["_key"]]
            diff = max(abs(api[c] - float(ref[c])) for c in classes)
            worst = max(worst, diff)
            api_set = sorted((res.get("prediction_set") or {}).get("classes") or [])
            ref_set = sorted(str(ref["differential"]).split("|")) if isinstance(ref["differential"], str) else []
            if diff > 1e-6 or res["action"] != ref["action"] or api_set != ref_set:
                bad.append((row["_key"], diff, res["action"], ref["action"], api_set, ref["differential"]))
        print(f"{len(rows)} lesions: largest posterior difference predict vs /v1/analyze {worst:.2e}; "
              f"{len(bad)} disagreement(s)")
        for b in bad:
            print("  ", b)
        return 1 if bad else 0
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
