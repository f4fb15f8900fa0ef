"""Our GPTQ vs llm-compressor's GPTQModifier, side by side in one run, on identical calibration
tokens, both checkpoints scored by the same perplexity code (ours).

Both are configured alike: weight-only asymmetric int quantization of every Linear in the decoder
layers, groups of --group-size input columns, min/max grids, blocks of 128 columns, damping 1% of the
mean Hessian diagonal, no act-order (see benchmarks/peers/llmcompressor_gptq.py for the peer's exact
config and the differences that remain). llm-compressor lives in its own virtualenv (it pins its own
stack); see benchmarks/peers/README.md.

    python benchmarks/peer_gptq.py --model ../shared/models/shakespeare-llama-7m \
        --calibration ../shared/corpus/shakespeare-milton/train.txt \
        --eval ../shared/corpus/shakespeare-milton/eval.txt \
        --peer-python .peers/llmc-venv/bin/python --json docs/results/peer-gptq-llama-7m.json
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
from compress.pipeline import MODEL_DIR, run
from compress.recipe import CalibrationSpec, ModelSpec, validate_recipe

PEER_SCRIPT = Path(__file__).parent / "peers" / "llmcompressor_gptq.py"


def checkpoint_perplexity(path: Path, windows: torch.Tensor) -> float:
    model = load_model(ModelSpec(source=str(path), device="cpu")).model
    return perplexity(model, windows, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--peer-python", required=True, help="python of the llm-compressor virtualenv")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    calibration = CalibrationSpec(text=[args.calibration], nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    loaded = load_model(ModelSpec(source=args.model, device="cpu"))
    tokens, _ = calibration_tokens(calibration, loaded.tokenizer)
    windows = eval_windows(tokenize(loaded.tokenizer, read_text_file(args.eval, "evaluation")), args.seqlen)
    dense_ppl = perplexity(loaded.model, windows, torch.device("cpu"))
    print(f"dense perplexity {dense_ppl:.4f} ({windows.shape[0]} windows of {args.seqlen})", flush=True)
    del loaded
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        token_file = Path(scratch) / "calibration.pt"
        torch.save(tokens, token_file)
        for bits in (int(b) for b in args.bits.split(",")):
            stage = {"method": "gptq", "bits": bits, "group_size": args.group_size}
            recipe = validate_recipe({
                "model": {"source": args.model, "device": "cpu"},
                "calibration": calibration.model_dump(),
                "stages": [stage],
                "evaluate": {"text": args.eval, "seqlen": args.seqlen, "dense": False},
            }, name=f"ours-w{bits}")
            ours_dir = Path(scratch) / f"ours-w{bits}"
            ours = run(recipe, ours_dir)
            ours_ppl = checkpoint_perplexity(ours_dir / MODEL_DIR, windows)

            peer_dir = Path(scratch) / f"peer-w{bits}"
            start = time.perf_counter()
            subprocess.run([args.peer_python, str(PEER_SCRIPT), "--model", args.model, "--calib-tokens", str(token_file),
                            "--bits", str(bits), "--group-size", str(args.group_size), "--out", str(peer_dir)], check=True)
            peer_process_seconds = time.perf_counter() - start
            peer = json.loads((peer_dir / "peer.json").read_text())
            peer_ppl = checkpoint_perplexity(peer_dir, windows)

            rows.append({
                "bits": bits,
                "group_size": args.group_size,
                "ours_perplexity": ours_ppl,
                "peer_perplexity": peer_ppl,
                "ours_pipeline_perplexity": ours["metrics"]["perplexity"],  # the pipeline's own score (same code)
                "ours_bits_per_param": ours["metrics"]["bits_per_param"],  # measured from the packed file
                # the stage plus the engine's calibration forward passes (the peer's oneshot time has both)
                "ours_seconds": ours["stages"][0]["seconds"] + ours["calibration"]["forward_seconds"],
                "ours_stage_seconds": ours["stages"][0]["seconds"],
                "ours_forward_seconds": ours["calibration"]["forward_seconds"],
                "peer_seconds": peer["seconds"],
                "peer_process_seconds": peer_process_seconds,
                "peer_version": peer.get("version"),
                "peer_config": peer.get("config"),
            })
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "peer_config"}), flush=True)
    lines = [
        "| bits (group) | ours ppl | llm-compressor ppl | ppl ratio (ours/peer) | ours bits/param | ours s | "
        "llm-compressor s | time ratio (peer/ours) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['bits']} ({row['group_size']}) | {row['ours_perplexity']:.2f} | {row['peer_perplexity']:.2f} | "
            f"{row['ours_perplexity'] / row['peer_perplexity']:.3f} | {row['ours_bits_per_param']:.3f} | "
            f"{row['ours_seconds']:.1f} | {row['peer_seconds']:.1f} | {row['peer_seconds'] / row['ours_seconds']:.2f} |"
        )
    table = "\n".join(lines)
    print(f"dense perplexity {dense_ppl:.2f}")
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"dense_perplexity": dense_ppl, "rows": rows, "table": table, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
