"""Bytes on disk of the packed export against the dense bf16 checkpoint, counted from the files.

Runs shipped recipes on a model (default: the shipped shakespeare-llama-7m) with `output.hf: true` so
the dense checkpoint of the same run is written beside `packed/`, and reports per recipe: the bytes of
packed/ (weights, config, tokenizer), of the dense checkpoint, their ratio, and the same ratio over the
compressed targets' tensors only (embeddings and norms stay dense in both; on a 7B model they are ~3%
of the weights, on the 6.8M model ~30%).

    python benchmarks/export_sizes.py --model ../shared/models/shakespeare-llama-7m --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import compress
from compress.deploy.packed_model import stored_bytes
from compress.model.checkpoint import read_header

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["wanda-2of4", "wanda-50", "wanda-dsnot-70", "rtn-4bit", "gptq-3bit", "spqr-3bit", "squeezellm-3bit", "wanda-2of4-spqr"]


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(recipe: str, model: str, scratch: Path) -> dict:
    out = scratch / recipe
    report = compress.run(ROOT / "recipes" / f"{recipe}.yaml", out=out, track=False, overrides=[f"model.source={model}", "output.hf=true"])
    targets = list(report["targets"])
    dense_target_bytes = 0
    for file in (out / "model").glob("*.safetensors"):
        for key, info in read_header(file).items():
            if key.endswith(".weight") and key[: -len(".weight")] in report["targets"]:
                dense_target_bytes += info["data_offsets"][1] - info["data_offsets"][0]
    packed_targets = stored_bytes(out / "packed", targets)["target_bytes"]
    packed, dense = safetensors_bytes(out / "packed"), safetensors_bytes(out / "model")
    return {"recipe": recipe, "formats": report["formats"], "bits_per_param": round(report["metrics"]["bits_per_param"], 3),
            "packed_bytes": packed, "dense_bytes": dense, "ratio": round(packed / dense, 3),
            "target_ratio": round(packed_targets / dense_target_bytes, 3), "output_bytes": report["metrics"]["output_bytes"],
            "verify_ok": report["metrics"].get("verify_ok"), "perplexity": round(report["metrics"]["perplexity"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "shakespeare-llama-7m"))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--json", action="store_true", help="one JSON record per recipe")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compress-sizes-") as scratch:
        for recipe in args.recipes.split(","):
            row = measure(recipe, args.model, Path(scratch))
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{row['recipe']:<18} {row['packed_bytes']:>11,} / {row['dense_bytes']:>11,} = {row['ratio']:.3f}  "
                      f"targets {row['target_ratio']:.3f}  bits/param {row['bits_per_param']}  {row['formats']}", flush=True)


if __name__ == "__main__":
    main()
