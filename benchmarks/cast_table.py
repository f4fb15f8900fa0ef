"""CAST against what peers do, at the same training budget, on one model and text: the table of
docs/training.md.

Rows: the dense model as shipped and after the same continued training (no sparsity); Wanda and
SparseGPT 2:4 one-shot; Wanda 2:4 then fixed-mask fine-tuning (same budget, same distillation); CAST
2:4 and its ablations (no weight scaling, no distillation), and CAST with the activation-aware mask
score (ours). Every training row sees the same tokens
(steps x batch x seqlen from the same text, same seed) and learning-rate schedule.

    python benchmarks/cast_table.py --model ../shared/models/shakespeare-llama-7m \
        --train-text ../shared/corpus/shakespeare-milton/train.txt --eval-text ../shared/corpus/shakespeare-milton/eval.txt \
        --steps 400 --batch-size 16 --json benchmarks/results/cast_table.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import compress

TRAINING = ("steps", "batch_size", "seqlen", "lr", "warmup_steps")


def rows(args: argparse.Namespace) -> dict[str, list[dict]]:
    budget = {"steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen, "lr": args.lr,
              "warmup_steps": max(1, args.steps // 20), "log_every": max(1, args.steps // 40), "checkpoint_every": 0}
    distill = {"kl_weight": 1 / 3, "ce_weight": 2 / 3}  # CAST's eta = 1/3, given to every training row alike
    cast = {"method": "cast", "pattern": "2:4", "decay": args.decay, **budget}
    table = {  # the rows most worth having first (a time limit keeps what finished)
        "cast 2:4": [cast],
        "wanda 2:4 + fixed-mask fine-tuning": [{"method": "wanda", "pattern": "2:4"}, {"method": "finetune", **budget, **distill}],
        "wanda 2:4": [{"method": "wanda", "pattern": "2:4"}],
        "sparsegpt 2:4": [{"method": "sparsegpt", "pattern": "2:4"}],
        "dense + same budget": [{"method": "finetune", **budget, **distill}],
        "cast 2:4, no weight scaling": [{**cast, "weight_scaling": False}],
        "cast 2:4, no distillation": [{**cast, "kl_weight": 0.0, "ce_weight": 1.0}],
        "cast 2:4, activation score": [{**cast, "mask_score": "activation"}],
    }
    return {name: stages for name, stages in table.items() if not args.only or name in args.only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train-text", required=True)
    parser.add_argument("--eval-text", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--decay", type=float, default=1e-2)
    parser.add_argument("--only", nargs="*", help="run only these rows (their names as printed)")
    parser.add_argument("--no-verify", action="store_true", help="skip the export's verify step (on a GPU it compiles kernels for minutes)")
    parser.add_argument("--json", help="append one JSON line per row to this file")
    args = parser.parse_args()
    base = {"calibration": {"text": [args.train_text], "seqlen": args.seqlen, "nsamples": 128},
            "evaluate": {"text": args.eval_text, "seqlen": args.seqlen, "layer_error": False},
            "output": {"onnx": False, "verify": not args.no_verify}}
    tokens = args.steps * args.batch_size * args.seqlen
    print(f"{'row':<40} {'tokens':>10} {'ppl':>9} {'kl':>7} {'sparsity':>8} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as scratch:
        for name, stages in rows(args).items():
            started = time.perf_counter()
            recipe = {"name": name.replace(" ", "-").replace(":", "of").replace(",", "").replace("+", "plus"), **base, "stages": stages}
            report = compress.run(recipe, model=args.model, out=Path(scratch) / recipe["name"], track=False)
            metrics = report["metrics"]
            trained = any(s["method"] in ("cast", "finetune") for s in stages)
            row = {"row": name, "tokens": tokens if trained else 0, "perplexity": metrics["perplexity"],
                   "dense_perplexity": metrics["dense_perplexity"], "kl_to_dense": metrics.get("kl_to_dense"),
                   "sparsity": metrics["sparsity"], "verify_ok": metrics.get("verify_ok"), "seconds": time.perf_counter() - started,
                   "training": [s.get("training") for s in report["stages"] if s.get("training")], "stages": stages}
            print(f"{name:<40} {row['tokens']:>10,} {row['perplexity']:>9.3f} {row['kl_to_dense'] or 0:>7.4f} "
                  f"{row['sparsity']:>8.4f} {row['seconds']:>8.1f}", flush=True)
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print(f"dense as shipped: perplexity {metrics['dense_perplexity']:.3f}")


if __name__ == "__main__":
    main()
