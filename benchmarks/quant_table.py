"""Side-by-side quantization table: quality and measured bits/param of recipe configurations.

Every row is a full `compress` run (the pipeline of `compress run`); bits/param is measured from the
packed file's bytes. A configuration is `method:key=value,key=value`, stages chained with `+`:

    python benchmarks/quant_table.py --model ../shared/models/shakespeare-llama-7m \
        --calibration ../shared/corpus/shakespeare-milton/train.txt \
        --eval ../shared/corpus/shakespeare-milton/eval.txt \
        --configs "rtn:bits=4" "gptq:bits=4" "spqr:bits=4" "rtn:bits=3" "gptq:bits=3" "spqr:bits=3" \
        --json docs/results/quant-llama-7m.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import yaml

from compress.pipeline import run
from compress.steps import StepStore
from compress.recipe import validate_recipe


def parse_config(text: str) -> list[dict]:
    stages = []
    for part in text.split("+"):
        method, _, assignments = part.partition(":")
        stage = {"method": method}
        for assignment in filter(None, assignments.split(",")):
            key, _, value = assignment.partition("=")
            stage[key] = value if ":" in value else yaml.safe_load(value)  # "2:4" stays a pattern string
        stages.append(stage)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = {
        "model": {"source": args.model, "device": args.device},
        "calibration": {"text": [args.calibration], "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "output": {"onnx": False},  # the tables measure compression, not export
        "evaluate": {"text": args.eval, "seqlen": args.seqlen},
    }
    rows = []
    dense = None
    with tempfile.TemporaryDirectory() as scratch:
        for index, config in enumerate(args.configs):
            recipe = {**base, "stages": parse_config(config), "evaluate": {**base["evaluate"], "dense": dense is None}}
            start = time.perf_counter()
            report = run(validate_recipe(recipe, name=f"config-{index}"), Path(scratch) / f"config-{index}", store=StepStore(Path(scratch) / "steps"))
            metrics = report["metrics"]
            metric = "perplexity" if "perplexity" in metrics else "embedding_cosine"
            if dense is None:
                dense = metrics.get("dense_perplexity", 1.0)
            outliers = sum((t["quantized"] or {}).get("outliers", 0) for t in report["targets"].values())
            row = {
                "config": config,
                metric: metrics[metric],
                "bits_per_param": metrics["bits_per_param"],
                "outlier_share": outliers / metrics["target_params"],
                "sparsity": metrics["sparsity"],
                "stage_seconds": [s["seconds"] for s in report["stages"]],
            }
            rows.append(row)
            print(f"{config:<50} {metric} {row[metric]:.4f}  bits/param {row['bits_per_param']:.3f}  "
                  f"outliers {100 * row['outlier_share']:.2f}%  run {time.perf_counter() - start:.1f} s", flush=True)
    lines = [f"| configuration | {metric} | bits/param | outliers |", "|---|---|---|---|", f"| dense | {dense:.4f} | 16 | |"]
    lines += [f"| `{r['config']}` | {r[metric]:.4f} | {r['bits_per_param']:.3f} | {100 * r['outlier_share']:.2f}% |" for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"metric": metric, "dense": dense, "rows": rows, "args": vars(args), "table": table}, indent=2))


if __name__ == "__main__":
    main()
