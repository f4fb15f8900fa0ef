"""How much of the full KL the reported `kl_to_dense` (top-k next tokens + the rest as one bin) keeps.

    compress run recipes/rtn-3bit.yaml --model ../shared/models/shakespeare-llama-7m --out /tmp/rtn3 --set output.onnx=false
    python benchmarks/kl_bound.py --dense ../shared/models/shakespeare-llama-7m --compressed /tmp/rtn3/model \
        --eval ../shared/corpus/shakespeare-milton/eval.txt --k 64 256

Both models in float32 on CPU, non-overlapping windows as the evaluation step cuts them.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.calibration.data import read_text_file, tokenize
from compress.pipeline.metrics import causal_scores, eval_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--compressed", required=True, help="the model/ folder of a compress output")
    parser.add_argument("--eval", required=True)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[64])
    args = parser.parse_args()

    ids = tokenize(AutoTokenizer.from_pretrained(args.dense), read_text_file(args.eval, "eval"))
    windows = eval_windows(ids, args.seqlen)
    dense = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval()
    compressed = AutoModelForCausalLM.from_pretrained(args.compressed, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    full = 0.0
    with torch.no_grad():
        for batch in windows.split(8):
            p = dense(input_ids=batch).logits[:, :-1].double().log_softmax(-1)
            q = compressed(input_ids=batch).logits[:, :-1].double().log_softmax(-1)
            full += (p.exp() * (p - q)).sum(-1).sum().item()
    full /= windows.shape[0] * (windows.shape[1] - 1)
    print(f"full KL(dense || compressed): {full:.5f} nats/token over {windows.numel()} tokens")
    for k in args.k:
        reference = causal_scores(dense, windows, cpu, keep_top=k).top_tokens
        binned = causal_scores(compressed, windows, cpu, reference=reference).kl_to_reference
        print(f"top-{k} + rest: {binned:.5f} ({100 * binned / full:.1f}% of the full KL)")


if __name__ == "__main__":
    main()
