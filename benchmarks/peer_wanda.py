"""Our Wanda vs llm-compressor's WandaPruningModifier, side by side in one run, on identical
calibration tokens, both checkpoints scored by the same perplexity code.

llm-compressor lives in its own virtualenv (it pins its own stack); see benchmarks/peers/README.md.

    python benchmarks/peer_wanda.py --model ../shared/models/shakespeare-llama-7m \
        --calibration ../shared/corpus/shakespeare-milton/train.txt \
        --eval ../shared/corpus/shakespeare-milton/eval.txt \
        --peer-python .peers/llmc-venv/bin/python --json docs/results/peer-wanda-llama-7m.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from compress.data import calibration_tokens, read_text_file, tokenize
from compress.evaluate import eval_windows, perplexity
from compress.modeling import load_model
from compress.pipeline import run
from compress.recipe import CalibrationSpec, ModelSpec, validate_recipe

PEER_SCRIPT = Path(__file__).parent / "peers" / "llmcompressor_wanda.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--peer-python", required=True, help="python of the llm-compressor virtualenv")
    parser.add_argument("--patterns", default="0.5,2:4")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    calibration = CalibrationSpec(text=[args.calibration], nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    loaded = load_model(ModelSpec(source=args.model, device="cpu"))
    tokens, _ = calibration_tokens(calibration, loaded.tokenizer)
    windows = eval_windows(tokenize(loaded.tokenizer, read_text_file(args.eval, "evaluation")), args.seqlen)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        token_file = Path(scratch) / "calibration.pt"
        torch.save(tokens, token_file)
        for column in args.patterns.split(","):
            pattern, sparsity = (column, None) if ":" in column else ("unstructured", float(column))
            stage = {"method": "wanda", "pattern": pattern, **({"sparsity": sparsity} if sparsity else {})}
            recipe = validate_recipe({
                "model": {"source": args.model, "device": "cpu"},
                "calibration": calibration.model_dump(),
                "stages": [stage],
                "evaluate": {"text": args.eval, "seqlen": args.seqlen, "dense": False},
            }, name=f"ours-{column}")
            ours = run(recipe, Path(scratch) / f"ours-{column}")
            peer_dir = Path(scratch) / f"peer-{column}"
            start = time.perf_counter()
            subprocess.run([args.peer_python, str(PEER_SCRIPT), "--model", args.model, "--calib-tokens", str(token_file),
                            "--sparsity", str(sparsity or 0.5), "--pattern", pattern, "--out", str(peer_dir)], check=True)
            peer_process_seconds = time.perf_counter() - start
            peer = json.loads((peer_dir / "peer.json").read_text())
            peer_model = load_model(ModelSpec(source=str(peer_dir), device="cpu")).model
            peer_ppl = perplexity(peer_model, windows, torch.device("cpu"))
            rows.append({
                "pattern": column,
                "ours_perplexity": ours["metrics"]["perplexity"],
                "peer_perplexity": peer_ppl,
                "ours_sparsity": ours["metrics"]["sparsity"],
                "peer_sparsity": peer.get("overall_sparsity"),
                # the stage plus the engine's calibration forward passes (the peer's oneshot time has both)
                "ours_seconds": ours["stages"][0]["seconds"] + ours["calibration"]["forward_seconds"],
                "peer_seconds": peer["seconds"],
                "peer_process_seconds": peer_process_seconds,
                "peer_version": peer.get("version"),
            })
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| pattern | ours ppl | llm-compressor ppl | ours s | llm-compressor s | time ratio (peer/ours) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['pattern']} | {row['ours_perplexity']:.2f} | {row['peer_perplexity']:.2f} | "
                     f"{row['ours_seconds']:.1f} | {row['peer_seconds']:.1f} | {row['peer_seconds'] / row['ours_seconds']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "table": table, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
