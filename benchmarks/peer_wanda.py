"""Our Wanda vs llm-compressor's WandaPruningModifier, side by side in one run, on identical
calibration tokens, both checkpoints scored by the same perplexity code.

llm-compressor lives in its own virtualenv (it pins its own stack); see benchmarks/peers/README.md.

    python benchmarks/peer_wanda.py --model ../shared/models/shakespeare-llama-7m \
        --calibration ../shared/corpus/shakespeare-milton/train.txt \
        --eval ../shared/corpus/shakespeare-milton/eval.txt \
        --peer-python .peers/llmc-venv/bin/python --json docs/results/peer-wanda-llama-7m.json
"""

from __future__ import annotations

import json

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


def main() -> None:
    args = parse_args(__doc__, lambda parser: parser.add_argument("--patterns", default="0.5,2:4"))
    calibration, loaded, tokens, windows = prepare(args)
    rows = []
    with scratch_with_tokens(tokens) as (scratch, token_file):
        for column in args.patterns.split(","):
            pattern, sparsity = (column, None) if ":" in column else ("unstructured", float(column))
            stage = {"method": "wanda", "pattern": pattern, **({"sparsity": sparsity} if sparsity else {})}
            ours = run_ours(args, calibration, stage, f"ours-{column}", scratch / f"ours-{column}")
            peer_dir = scratch / f"peer-{column}"
            peer, peer_process_seconds = run_peer(args, "llmcompressor_wanda.py", token_file, peer_dir,
                                                  ["--sparsity", str(sparsity or 0.5), "--pattern", pattern])
            peer_ppl = checkpoint_perplexity(peer_dir, windows)
            rows.append({
                "pattern": column,
                "ours_perplexity": ours["metrics"]["perplexity"],
                "peer_perplexity": peer_ppl,
                "ours_sparsity": ours["metrics"]["sparsity"],
                "peer_sparsity": peer.get("overall_sparsity"),
                "ours_seconds": ours_seconds(ours),
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
    write_json(args.json, {"rows": rows, "table": table, "args": vars(args)})


if __name__ == "__main__":
    main()
