"""Sparse LoRA recovery at one sparsity, every row at the same training budget: the table of
docs/training.md.

Rows: Wanda pruned only; + sparse LoRA trained on CE; + sparse LoRA on CE + SquareHead (the default);
+ SoRA; the CE + SquareHead adapter trained over an NF4 base;
peft's own merge of the same adapter (the sparsity it loses); the dense model + the same LoRA
budget (the reference).

    python benchmarks/sparse_lora_table.py --model ../shared/models/shakespeare-llama-7m --sparsity 0.7 \
        --train-text ../shared/corpus/shakespeare-milton/train.txt --eval-text ../shared/corpus/shakespeare-milton/eval.txt \
        --steps 100 --batch-size 8 --json benchmarks/results/sparse_lora_table.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import compress


def peft_merge_sparsity(pruned: Path, adapter: Path) -> float:
    """The targets' sparsity after peft's own merge (W + BA) of `adapter` into the pruned model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    weights = [p for n, p in merged.named_parameters() if n.startswith("model.layers.") and n.endswith("proj.weight")]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train-text", required=True)
    parser.add_argument("--eval-text", required=True)
    parser.add_argument("--sparsity", default="0.7", help="a fraction, or an N:M pattern such as 2:4")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sora-lambda", type=float, default=10.0)
    parser.add_argument("--only", nargs="*", help="run only these rows (their names as printed)")
    parser.add_argument("--no-verify", action="store_true", help="skip the export's verify step (on a GPU it compiles kernels for minutes)")
    parser.add_argument("--json")
    args = parser.parse_args()
    prune = {"method": "wanda", "pattern": args.sparsity} if ":" in args.sparsity else {"method": "wanda", "sparsity": float(args.sparsity)}
    lora = {"method": "sparse_lora", "rank": args.rank, "alpha": float(args.rank), "steps": args.steps, "batch_size": args.batch_size,
            "seqlen": args.seqlen, "lr": args.lr, "warmup_steps": max(1, args.steps // 20), "log_every": max(1, args.steps // 20),
            "checkpoint_every": 0}
    rows = {
        "pruned only": [prune],
        "+ sparse LoRA (CE)": [prune, {**lora, "feature_weight": 0.0}],
        "+ sparse LoRA (CE + SquareHead)": [prune, lora],
        "+ SoRA (CE + SquareHead)": [prune, {**lora, "sora": True, "sora_lambda": args.sora_lambda}],
        "+ sparse LoRA (CE + SquareHead), NF4 base": [prune, {**lora, "base_quantization": "nf4"}],
        "dense + the same LoRA budget": [{**lora, "feature_weight": 0.0}],
    }
    base = {"calibration": {"text": [args.train_text], "seqlen": args.seqlen, "nsamples": 128},
            "evaluate": {"text": args.eval_text, "seqlen": args.seqlen, "layer_error": False}, "output": {"onnx": False}}
    rows = {name: stages for name, stages in rows.items() if not args.only or name in args.only or name == "pruned only"}
    tokens = args.steps * args.batch_size * args.seqlen
    print(f"{'row':<36} {'tokens':>9} {'ppl':>9} {'sparsity':>9} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as scratch:
        outs = {}
        for name, stages in rows.items():
            started = time.perf_counter()
            out = Path(scratch) / f"row{len(outs)}"
            output = {"onnx": False, "hf": name == "pruned only", "verify": not args.no_verify}
            recipe = {"name": f"lora-{len(outs)}", **base, "stages": stages, "output": output}
            report = compress.run(recipe, model=args.model, out=out, track=False)
            outs[name] = out
            metrics = report["metrics"]
            trained = [s["training"] for s in report["stages"] if s.get("training")]
            row = {"row": name, "sparsity_target": args.sparsity, "tokens": tokens if trained else 0, "perplexity": metrics["perplexity"],
                   "dense_perplexity": metrics["dense_perplexity"], "sparsity": metrics["sparsity"], "verify_ok": metrics.get("verify_ok"),
                   "adapter": [s.get("adapter") for s in report["stages"] if s.get("adapter")], "training": trained,
                   "seconds": time.perf_counter() - started, "stages": stages}
            _emit(row, args.json)
        if "+ sparse LoRA (CE + SquareHead)" not in outs:
            return
        lost = peft_merge_sparsity(outs["pruned only"] / "model", outs["+ sparse LoRA (CE + SquareHead)"] / "adapter")
        _emit({"row": "peft's own merge of the CE + SquareHead adapter", "sparsity_target": args.sparsity, "tokens": tokens,
               "perplexity": None, "sparsity": lost}, args.json)
    print(f"dense as shipped: perplexity {metrics['dense_perplexity']:.3f}")


def _emit(row: dict, path: str | None) -> None:
    ppl = f"{row['perplexity']:9.3f}" if row.get("perplexity") else f"{'-':>9}"
    print(f"{row['row']:<36} {row['tokens']:>9,} {ppl} {row['sparsity']:>9.4f} {row.get('seconds', 0):>8.1f}", flush=True)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
