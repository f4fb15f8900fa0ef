#!/usr/bin/env python
"""Peer baseline: llm-compressor's WandaPruningModifier, run standalone.

Run with the *peer* virtualenv's python (see benchmarks/peers/README.md), not
with the project's own environment:

    .peers/llmc-venv/bin/python benchmarks/peers/llmcompressor_wanda.py \
        --model PATH --calib-tokens TOKENS.pt --sparsity 0.5 \
        --pattern unstructured|N:M --out DIR [--device cpu] [--eval-text FILE]

TOKENS.pt is a LongTensor [nsamples, seqlen] of input ids; exactly those rows
are fed to llm-compressor's ``oneshot`` (no shuffling, no re-tokenisation),
with num_calibration_samples = nsamples and max_seq_length = seqlen.

Which modules get pruned
------------------------
In llm-compressor (checked on 0.14.0.1) the ``targets`` of the sparsity
modifiers (SparseGPT / Wanda) name the *containers* whose prunable children
(Linear / Conv) are pruned, and ``ignore`` is matched against
``f"{container_name}.{child_name}"``:

* default ``targets=["Linear"]``: every Linear is its own container, so
  ``lm_head`` is pruned too (with tied embeddings that zeroes half of the
  input embedding matrix as well).
* ``targets="Linear"`` (a *string*): the modifier iterates over the string's
  characters, matches nothing and silently prunes nothing.
* ``targets=["Linear"], ignore=["lm_head"]``: the child name becomes
  ``"lm_head."`` (trailing dot), so an exact ``"lm_head"`` ignore never matches.

So this script targets the decoder-layer class(es) (``model._no_split_modules``,
e.g. ``LlamaDecoderLayer`` — the same modules the sequential pipeline walks),
which prunes every Linear inside the decoder layers and nothing else; it also
ignores ``re:.*lm_head`` as a safety net. The per-module sparsity measured
after ``oneshot`` is checked against that expectation and the script fails
loudly if anything outside the decoder layers changed or a decoder Linear was
left dense.

Checked with llmcompressor 0.14.0.1 / torch 2.13.0+cpu / transformers 5.17.0
on shakespeare-llama-7m (64x256 calibration tokens): all 42 decoder Linears at
exactly 50%, lm_head / embeddings untouched, and the perplexities match an
independent hand-written sequential Wanda to 1e-6 (50%: 100.35, 2:4: 135.37).
"""

from __future__ import annotations

import argparse
import os
import re

import torch
from peer_common import (  # first: it sets the offline switches before torch is imported
    add_input_args,
    add_output_args,
    calibration_dataset,
    decoder_layer_classes,
    eval_perplexity,
    fail_on_problems,
    layer_linear_names,
    load_calib_tokens,
    load_model,
    oneshot_record,
    peer_result,
    run_oneshot,
    save_checkpoint,
    weight_snapshot,
    write_result,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_args(p)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured",
                   help="'unstructured' or 'N:M' (e.g. 2:4)")
    add_output_args(p, "dtype the model is loaded in for calibration and "
                       "evaluation (default float32). The checkpoint is "
                       "saved in the model's original dtype: Wanda only "
                       "zeroes weights, so the cast back is lossless.")
    return p.parse_args(argv)


def mask_structure(pattern: str) -> str:
    if pattern.lower() in ("unstructured", "0:0"):
        return "0:0"
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not m or int(m.group(1)) <= 0 or int(m.group(1)) >= int(m.group(2)):
        raise SystemExit(f"--pattern must be 'unstructured' or N:M with 0<N<M, got {pattern!r}")
    return f"{int(m.group(1))}:{int(m.group(2))}"


def sparsity_report(model, before, expected, target, structure):
    """Per-module sparsity after pruning + sanity checks; returns a dict."""
    per_module = {}
    zeros = total = 0
    problems = []
    mods = dict(model.named_modules())
    n, m = (int(x) for x in structure.split(":"))
    for name in expected:
        w = mods[name].weight.detach().cpu()
        z = int((w == 0).sum())
        per_module[name] = z / w.numel()
        zeros += z
        total += w.numel()
        want = n / m if n else target
        if per_module[name] + 1e-3 < want:
            problems.append(f"{name}: sparsity {per_module[name]:.4f} < {want}")
        if n:
            # each group of M consecutive input weights has >= N zeros
            rows = w.reshape(w.shape[0], -1, m) if w.shape[1] % m == 0 else None
            if rows is not None and int(((rows == 0).sum(-1) < n).sum()) > 0:
                problems.append(f"{name}: not {n}:{m} sparse")
    for name, w0 in before.items():
        if name in per_module:
            continue
        w1 = mods[name].weight.detach().cpu()
        if not torch.equal(w0, w1):
            problems.append(f"{name}: outside the decoder layers but was modified")
    return per_module, (zeros / total if total else 0.0), problems


def main(argv=None):
    args = parse_args(argv)
    structure = mask_structure(args.pattern)

    from llmcompressor.modifiers.pruning import WandaPruningModifier

    torch.manual_seed(0)
    tokens = load_calib_tokens(args.calib_tokens)
    tokenizer, model, orig_dtype = load_model(args)

    layer_classes = decoder_layer_classes(model)
    config = {
        "sparsity": args.sparsity,
        "mask_structure": structure,
        "targets": layer_classes,
        "ignore": ["re:.*lm_head"],
    }
    modifier = WandaPruningModifier(**config)
    expected = layer_linear_names(model, layer_classes)
    before = weight_snapshot(model)
    ds = calibration_dataset(tokens)

    dense_ppl = eval_perplexity(model, tokenizer, args, dense=True)
    model, seconds = run_oneshot(model, tokenizer, ds, modifier, tokens, layer_classes)

    per_module, overall, problems = sparsity_report(
        model, before, expected, args.sparsity, structure)
    for name, s in per_module.items():
        print(f"  {name:45s} {s:.4f}")
    print(f"overall sparsity (decoder Linears): {overall:.4f}  "
          f"modules pruned: {sum(1 for s in per_module.values() if s > 0)}/{len(expected)}")
    fail_on_problems(problems, "pruned module set is not exactly the decoder-layer Linears")

    ppl = eval_perplexity(model, tokenizer, args, dense=False)

    os.makedirs(args.out, exist_ok=True)
    if not args.no_save:
        save_checkpoint(model, tokenizer, args, orig_dtype)

    result = peer_result(args, seconds, {
        "sparsity_per_module": per_module,
        "overall_sparsity": overall,
        "config": {"modifier": "WandaPruningModifier", **config,
                   **oneshot_record(tokens, layer_classes, args)},
    }, ppl, dense_ppl)
    write_result(args, result, ("tool", "version", "seconds", "overall_sparsity", "perplexity"))


if __name__ == "__main__":
    main()
