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

import torch
from peer_common_driver import (
    checkpoint_perplexity,
    ours_seconds,
    parse_args,
    prepare,
    run_ours,
    run_peer,
    scratch_with_tokens,
    write_json,
)

from compress.pipeline.metrics import perplexity
from compress.pipeline.store import MODEL_DIR


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--group-size", type=int, default=128)


def main() -> None:
    args = parse_args(__doc__, add_args)
    calibration, loaded, tokens, windows = prepare(args)
    dense_ppl = perplexity(loaded.model, windows, torch.device("cpu"))
    print(f"dense perplexity {dense_ppl:.4f} ({windows.shape[0]} windows of {args.seqlen})", flush=True)
    del loaded
    rows = []
    with scratch_with_tokens(tokens) as (scratch, token_file):
        for bits in (int(b) for b in args.bits.split(",")):
            stage = {"method": "gptq", "bits": bits, "group_size": args.group_size}
            ours_dir = scratch / f"ours-w{bits}"
            ours = run_ours(args, calibration, stage, f"ours-w{bits}", ours_dir)
            ours_ppl = checkpoint_perplexity(ours_dir / MODEL_DIR, windows)

            peer_dir = scratch / f"peer-w{bits}"
            peer, peer_process_seconds = run_peer(args, "llmcompressor_gptq.py", token_file, peer_dir,
                                                  ["--bits", str(bits), "--group-size", str(args.group_size)])
            peer_ppl = checkpoint_perplexity(peer_dir, windows)

            rows.append({
                "bits": bits,
                "group_size": args.group_size,
                "ours_perplexity": ours_ppl,
                "peer_perplexity": peer_ppl,
                "ours_pipeline_perplexity": ours["metrics"]["perplexity"],  # the pipeline's own score (same code)
                "ours_bits_per_param": ours["metrics"]["bits_per_param"],  # measured from the packed file
                "ours_seconds": ours_seconds(ours),
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
    write_json(args.json, {"dense_perplexity": dense_ppl, "rows": rows, "table": table, "args": vars(args)})


if __name__ == "__main__":
    main()
