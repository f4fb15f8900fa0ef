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

from compress.pipeline.engine import run
from compress.pipeline.store import StepStore
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="calibration seeds: each configuration runs once per seed; the table gives the mean and the spread")
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
            runs = []
            for seed in args.seeds:
                calibration = {**base["calibration"], "seed": seed}
                # the dense pass runs once (a cached step after that); every run needs its top tokens for the KL
                recipe = {**base, "calibration": calibration, "stages": parse_config(config)}
                start = time.perf_counter()
                report = run(validate_recipe(recipe, name=f"config-{index}-seed-{seed}"), Path(scratch) / f"config-{index}-seed-{seed}",
                             store=StepStore(Path(scratch) / "steps"))
                metrics = report["metrics"]
                metric = "perplexity" if "perplexity" in metrics else "embedding_cosine"
                if dense is None:
                    dense = metrics.get("dense_perplexity", 1.0)
                outliers = sum((t["quantized"] or {}).get("outliers", 0) for t in report["targets"].values())
                runs.append({
                    "seed": seed,
                    metric: metrics[metric],
                    "bits_per_param": metrics["bits_per_param"],
                    "outlier_share": outliers / metrics["target_params"],
                    "sparsity": metrics["sparsity"],
                    **{k: metrics[k] for k in ("kl_to_dense", "top1_agreement") if k in metrics},
                    "stage_seconds": [s["seconds"] for s in report["stages"]],
                    "seconds": time.perf_counter() - start,
                })
                kl = f"  KL {metrics['kl_to_dense']:.5f}" if "kl_to_dense" in metrics else ""
                print(f"{config:<50} seed {seed}  {metric} {metrics[metric]:.4f}{kl}  bits/param {metrics['bits_per_param']:.3f}  "
                      f"outliers {100 * runs[-1]['outlier_share']:.2f}%  run {runs[-1]['seconds']:.1f} s", flush=True)
            values = [r[metric] for r in runs]
            # one seed keeps the old row layout; several add the per-seed runs, mean and spread
            row = {"config": config, **{k: v for k, v in runs[0].items() if k not in ("seed", "seconds")}}
            if len(runs) > 1:
                row.update({metric: sum(values) / len(values), "min": min(values), "max": max(values),
                            "bits_per_param": sum(r["bits_per_param"] for r in runs) / len(runs),
                            "outlier_share": sum(r["outlier_share"] for r in runs) / len(runs), "runs": runs})
                for name in ("kl_to_dense", "top1_agreement"):
                    if name in runs[0]:
                        spread_of = [r[name] for r in runs]
                        row.update({name: sum(spread_of) / len(runs), f"{name}_min": min(spread_of), f"{name}_max": max(spread_of)})
            rows.append(row)
            if args.json:  # after every configuration: a run stopped part way keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"metric": metric, "dense": dense, "rows": rows, "args": vars(args)}, indent=2))
    spread = len(args.seeds) > 1
    head = f"| configuration | {metric}{f' (mean of {len(args.seeds)} seeds)' if spread else ''} |" + (" min - max |" if spread else "")
    has_kl = all("kl_to_dense" in r for r in rows)
    lines = [head + " bits/param | outliers |" + (" KL to dense (x1000) | top-1 agreement |" if has_kl else ""),
             "|---|---|" + ("---|" if spread else "") + "---|---|" + ("---|---|" if has_kl else ""),
             f"| dense | {dense:.4f} |" + (" |" if spread else "") + " 16 | |" + (" 0 | 1 |" if has_kl else "")]
    lines += [f"| `{r['config']}` | {r[metric]:.4f} |" + (f" {r['min']:.4f} - {r['max']:.4f} |" if spread else "")
              + f" {r['bits_per_param']:.3f} | {100 * r['outlier_share']:.2f}% |"
              + (f" {1000 * r['kl_to_dense']:.2f}" + (f" [{1000 * r['kl_to_dense_min']:.2f}-{1000 * r['kl_to_dense_max']:.2f}]" if spread else "")
                 + f" | {r['top1_agreement']:.4f} |" if has_kl else "") for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"metric": metric, "dense": dense, "rows": rows, "args": vars(args), "table": table}, indent=2))


if __name__ == "__main__":
    main()
