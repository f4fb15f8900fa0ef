"""Side-by-side pruning table: dense vs pruning methods at several sparsities and N:M patterns.

Every cell is a full `compress` run (the same pipeline as `compress run`), so the numbers are what a
user gets. Causal LMs report perplexity; encoders report embedding cosine to the dense model. A method
`a+b` chains stages: `a` prunes to the column's sparsity or pattern, `b` (e.g. dsnot) refines it with
its default parameters.

    python benchmarks/pruning_table.py --model ../shared/models/shakespeare-llama-7m \
        --calibration ../shared/corpus/shakespeare-milton/train.txt \
        --eval ../shared/corpus/shakespeare-milton/eval.txt --json docs/results/pruning-llama-7m.json
    python benchmarks/pruning_table.py ... --methods magnitude,wanda,wanda+dsnot,sparsegpt,sparsegpt+dsnot \
        --patterns 0.5,0.6,0.7,2:4
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from compress.pipeline.engine import run
from compress.pipeline.store import StepStore
from compress.recipe import validate_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True, help="calibration text file")
    parser.add_argument("--eval", required=True, help="evaluation text file")
    parser.add_argument("--methods", default="magnitude,wanda")
    parser.add_argument("--patterns", default="0.5,0.6,0.7,2:4,4:8", help="sparsities and N:M patterns")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256, help="calibration and evaluation window")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = {
        "model": {"source": args.model, "device": args.device, "dtype": args.dtype},
        "calibration": {"text": [args.calibration], "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "output": {"onnx": False},  # the tables measure compression, not export
        "evaluate": {"text": args.eval, "seqlen": args.seqlen, "max_windows": args.max_windows, "dense": False},
    }
    columns = args.patterns.split(",")
    results: dict[str, dict[str, float]] = {}
    dense_value = None
    metric = None
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods.split(","):
            results[method] = {}
            for column in columns:
                first, *refiners = method.split("+")
                stage = {"method": first, "pattern": column} if ":" in column else {"method": first, "sparsity": float(column)}
                recipe = {**base, "stages": [stage] + [{"method": name} for name in refiners]}
                recipe["evaluate"] = {**base["evaluate"], "dense": dense_value is None}
                start = time.perf_counter()
                report = run(validate_recipe(recipe, name=f"{method}-{column}"), Path(scratch) / f"{method}-{column}",
                             store=StepStore(Path(scratch) / "steps"))
                metrics = report["metrics"]
                metric = "perplexity" if "perplexity" in metrics else "embedding_cosine"
                if dense_value is None:
                    dense_value = metrics.get("dense_perplexity", 1.0)
                results[method][column] = metrics[metric]
                stage_seconds = " + ".join(f"{stage['seconds']:.1f}" for stage in report["stages"])
                print(f"{method:<16} {column:<6} {metric} {metrics[metric]:.4f}  sparsity {metrics['sparsity']:.4f}  "
                      f"stages {stage_seconds} s  run {time.perf_counter() - start:.1f} s", flush=True)

    header = "| method | " + " | ".join(f"{c} " + ("unstructured" if ":" not in c else "") for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1), "| dense | " + " | ".join(f"{dense_value:.4f}" for _ in columns) + " |"]
    for method, row in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    table = "\n".join(lines)
    print(f"\n{metric} ({'lower' if metric == 'perplexity' else 'higher'} is better)\n{table}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"metric": metric, "dense": dense_value, "results": results,
                                               "args": vars(args), "table": table}, indent=2))


if __name__ == "__main__":
    main()
