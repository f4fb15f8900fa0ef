"""Fingerprints of every shipped recipe's output on the embedded model: the report's metrics and the
SHA-256 of each file the compressed model consists of. Run it before and after a change that must not
change results, and diff the two JSON files.

    python scripts/output_fingerprints.py > before.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = {"seconds"}  # wall time differs run to run


def _run(recipe_path: Path, out: Path) -> dict:
    import compress

    if not hasattr(compress, "run"):  # before the public API existed
        from compress.pipeline import run as pipeline_run
        from compress.recipe import load_recipe

        return pipeline_run(load_recipe(recipe_path, ["output.onnx=false"]), out)
    return compress.run(recipe_path, out=out, overrides=["output.onnx=false"], track=False)


def fingerprint(out: Path, report: dict) -> dict:
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        if path.name in ("report.json", "recipe.json"):
            continue
        files[str(path.relative_to(out))] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    metrics = {k: v for k, v in report["metrics"].items() if k not in VOLATILE}
    return {"metrics": metrics, "files": files}


def main() -> None:
    names = sys.argv[1:] or sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("COMPRESS_HOME", str(Path(scratch) / "home"))
        for name in names:
            out = Path(scratch) / name
            report = _run(ROOT / "recipes" / f"{name}.yaml", out)
            results[name] = fingerprint(out, report)
            print(name, json.dumps(results[name]["metrics"]), file=sys.stderr)
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
