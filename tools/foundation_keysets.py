"""Write the upstream state-dict key set (with shapes) of every foundation encoder dermfusion claims.

    python tools/foundation_keysets.py            # (re)writes src/dermfusion/models/upstream_keys/*.json
    python tools/foundation_keysets.py --check    # exit 1 if a committed file differs from the description

Each architecture is built at full size on the ``meta`` device (no memory, seconds) from this project's own
description in ``tools/upstream_arch.py``; the JSON records the key set, the prefixes a published file may carry
around it, and where every fact came from (repository, path, commit). ``dermfusion weights check`` compares a
downloaded file with these sets; ``tests/models/test_upstream_keysets.py`` checks that the loaders map every key.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from upstream_arch import catalogue, key_set  # noqa: E402

OUT = HERE.parent / "src" / "dermfusion" / "models" / "upstream_keys"


def document(name: str, entry: dict) -> dict:
    with torch.device("meta"):
        module = entry["build"]()
    return {"name": name, "description": entry["note"], "accepted_prefixes": entry["prefixes"],
            "generated_by": "tools/foundation_keysets.py from tools/upstream_arch.py", "upstream": entry["facts"],
            "keys": key_set(module)}


def render(doc: dict) -> str:
    head = {k: v for k, v in doc.items() if k != "keys"}
    text = json.dumps(head, indent=1)[:-2]  # one key per line below keeps the file diffable and small
    keys = ",\n".join(f"  {json.dumps(k)}: {json.dumps(s)}" for k, s in doc["keys"].items())
    return text + ',\n "keys": {\n' + keys + "\n }\n}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, entry in catalogue().items():
        text = render(document(name, entry))
        path = OUT / f"{name}.json"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"{path.relative_to(HERE.parent)}: {len(json.loads(text)['keys'])} keys, {len(text) // 1024} KiB")
    if stale:
        print("out of date (run python tools/foundation_keysets.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
