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
import json
import math
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--calib-tokens", required=True,
                   help="torch LongTensor [nsamples, seqlen] of input ids (.pt)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured",
                   help="'unstructured' or 'N:M' (e.g. 2:4)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-text", default=None,
                   help="plain-text file for perplexity (256-token windows)")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES) + ["auto"],
                   help="dtype the model is loaded in for calibration and "
                        "evaluation (default float32). The checkpoint is "
                        "saved in the model's original dtype: Wanda only "
                        "zeroes weights, so the cast back is lossless.")
    p.add_argument("--no-save", action="store_true",
                   help="skip writing the checkpoint (peer.json is still written)")
    return p.parse_args(argv)


def mask_structure(pattern: str) -> str:
    if pattern.lower() in ("unstructured", "0:0"):
        return "0:0"
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not m or int(m.group(1)) <= 0 or int(m.group(1)) >= int(m.group(2)):
        raise SystemExit(f"--pattern must be 'unstructured' or N:M with 0<N<M, got {pattern!r}")
    return f"{int(m.group(1))}:{int(m.group(2))}"


def decoder_layer_classes(model) -> list[str]:
    names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in names if n in present]
    if not names:
        raise SystemExit("cannot infer the decoder-layer class (model._no_split_modules)")
    return names


def linear_snapshot(model) -> dict[str, torch.Tensor]:
    """Clone of every nn.Linear / nn.Embedding weight (by module name)."""
    snap = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            snap[name] = mod.weight.detach().to("cpu", copy=True)
    return snap


def layer_linear_names(model, layer_classes) -> list[str]:
    out = []
    for lname, layer in model.named_modules():
        if type(layer).__name__ in layer_classes:
            for cname, child in layer.named_modules():
                if isinstance(child, torch.nn.Linear):
                    out.append(f"{lname}.{cname}")
    return out


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


@torch.no_grad()
def perplexity(model, tokenizer, path, seqlen, device):
    text = open(path, encoding="utf-8").read()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    nwin = ids.numel() // seqlen
    if nwin == 0:
        raise SystemExit(f"eval text has fewer than {seqlen} tokens")
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    bs = 8
    for i in range(0, nwin, bs):
        batch = windows[i:i + bs].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1), reduction="sum")
        nll_sum += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll_sum / count), nwin


def main(argv=None):
    args = parse_args(argv)
    structure = mask_structure(args.pattern)

    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokens = torch.load(args.calib_tokens)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise SystemExit("--calib-tokens must hold a 2-D LongTensor [nsamples, seqlen]")
    tokens = tokens.long().cpu()
    nsamples, seqlen = tokens.shape

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_kwargs = {}
    if args.dtype != "auto":
        load_kwargs["dtype"] = DTYPES[args.dtype]
    hf_config = AutoConfig.from_pretrained(args.model)
    orig_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(orig_dtype, str):
        orig_dtype = DTYPES.get(orig_dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
    model.to(args.device)
    model.eval()

    layer_classes = decoder_layer_classes(model)
    config = {
        "sparsity": args.sparsity,
        "mask_structure": structure,
        "targets": layer_classes,
        "ignore": ["re:.*lm_head"],
    }
    modifier = WandaPruningModifier(**config)
    expected = layer_linear_names(model, layer_classes)
    before = linear_snapshot(model)

    ds = datasets.Dataset.from_dict({
        "input_ids": tokens.tolist(),
        "attention_mask": torch.ones_like(tokens).tolist(),
    })

    dense_ppl = None
    if args.eval_text:
        dense_ppl, _ = perplexity(model, tokenizer, args.eval_text, args.eval_seqlen, args.device)
        print(f"dense perplexity: {dense_ppl:.4f}", flush=True)

    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        pad_to_max_length=False,
        batch_size=1,
        sequential_targets=layer_classes,
        output_dir=None,  # we save ourselves (dense format)
        log_dir=None,
    )
    seconds = time.perf_counter() - t0
    print(f"oneshot seconds: {seconds:.3f}", flush=True)

    per_module, overall, problems = sparsity_report(
        model, before, expected, args.sparsity, structure)
    for name, s in per_module.items():
        print(f"  {name:45s} {s:.4f}")
    print(f"overall sparsity (decoder Linears): {overall:.4f}  "
          f"modules pruned: {sum(1 for s in per_module.values() if s > 0)}/{len(expected)}")
    if problems:
        for p in problems:
            print("PROBLEM:", p, file=sys.stderr)
        raise SystemExit("pruned module set is not exactly the decoder-layer Linears")

    ppl = None
    if args.eval_text:
        ppl, nwin = perplexity(model, tokenizer, args.eval_text, args.eval_seqlen, args.device)
        print(f"perplexity: {ppl:.4f} ({nwin} windows of {args.eval_seqlen})", flush=True)

    os.makedirs(args.out, exist_ok=True)
    if not args.no_save:
        if isinstance(orig_dtype, torch.dtype) and args.dtype != "auto":
            model.to(orig_dtype)
        model.to("cpu")
        # plain dense HF checkpoint: oneshot wraps save_pretrained; without
        # save_compressed=False it would infer a compressed-tensors sparse format
        model.save_pretrained(args.out, save_compressed=False)
        tokenizer.save_pretrained(args.out)

    result = {
        "tool": "llmcompressor",
        "version": llmcompressor.__version__,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "seconds": seconds,
        "sparsity_per_module": per_module,
        "overall_sparsity": overall,
        "config": {"modifier": "WandaPruningModifier", **config,
                   "num_calibration_samples": nsamples, "max_seq_length": seqlen,
                   "sequential_targets": layer_classes,
                   "shuffle_calibration_samples": False, "batch_size": 1,
                   "dtype": args.dtype, "device": args.device},
        "perplexity": ppl,
        "dense_perplexity": dense_ppl,
        "eval_text": args.eval_text,
        "eval_seqlen": args.eval_seqlen,
        "model": os.path.abspath(args.model),
        "calib_tokens": os.path.abspath(args.calib_tokens),
    }
    with open(os.path.join(args.out, "peer.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("tool", "version", "seconds",
                                             "overall_sparsity", "perplexity")}))


if __name__ == "__main__":
    main()
