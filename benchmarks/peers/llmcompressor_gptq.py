#!/usr/bin/env python
"""Peer baseline: llm-compressor's GPTQModifier (weight-only int, grouped), run standalone.

Run with the *peer* virtualenv's python (see benchmarks/peers/README.md), not
with the project's own environment:

    .peers/llmc-venv/bin/python benchmarks/peers/llmcompressor_gptq.py \
        --model PATH --calib-tokens TOKENS.pt --bits 4 --group-size 128 \
        --out DIR [--device cpu] [--eval-text FILE]

TOKENS.pt is a LongTensor [nsamples, seqlen] of input ids; exactly those rows
are fed to llm-compressor's ``oneshot`` (no shuffling, no re-tokenisation),
with num_calibration_samples = nsamples and max_seq_length = seqlen.

Configuration (chosen to match ``compress``'s ``gptq`` stage)
-------------------------------------------------------------
``GPTQModifier(config_groups={"group_0": {targets: ["Linear"], weights:
{num_bits: B, type: int, symmetric: False, strategy: group, group_size: G,
actorder: None, observer: memoryless_minmax}}}, ignore=[every Linear outside
the decoder layers, e.g. "lm_head"], block_size=128, dampening_frac=0.01,
actorder=None)``, oneshot with ``sequential_targets=[decoder layer class]``
(``propagate_error`` left at its default True: each layer is calibrated on the
outputs of the already-quantized layers before it, as in ``compress``).

Pitfalls found in llm-compressor (checked on 0.14.0.1 / compressed-tensors 0.19.0)
-------------------------------------------------------------------------------
* ``GPTQModifier.actorder`` defaults to a sentinel that resolves to
  ``"static"`` (= ``"weight"``) activation ordering for every group/channel
  scheme: the columns are swept in order of decreasing Hessian diagonal.
  ``actorder=None`` in the weights args is NOT enough (None there reads as
  "unset" and the sentinel turns it into static, checked); plain GPTQ needs
  ``actorder=None`` passed to the modifier itself. ``actorder=True`` raises
  (the old "group" ordering is gone). The preset scheme "W4A16" is also
  symmetric and act-ordered.
* ``QuantizationArgs.symmetric`` defaults to True; asymmetric needs
  ``symmetric=False``. Its int range is signed ([-2^(b-1), 2^(b-1)-1]) with
  the zero point shifted accordingly: the same grid as an unsigned
  ``code - zero`` grid, just stored differently.
* The group scales/zero points are fitted ONCE, by the weight observer
  (memoryless min/max, range widened to include 0), on the layer's original
  weights before the GPTQ sweep ("static groups"), not lazily on the
  error-updated weights when the sweep reaches a group's first column as in
  the GPTQ reference (IST-DASLab/gptq with groupsize and without
  static_groups) and in ``compress``. There is no switch for the lazy variant.
* Scales stay in the calibration dtype (float32 here; no ``scale_dtype``), the
  zero point is rounded to int8. Zero scales become the dtype's eps.
* If the damped Hessian is not positive definite, llm-compressor silently
  falls back to round-to-nearest for that module (warning at the end);
  ``compress`` instead raises the damping tenfold (up to 4 times).
* The Hessian is 2 X^T X / (number of *sequences*, not tokens): a different
  constant factor from ours, cancelled by the relative damping.
* Weight-quantization ``targets`` here match module classes / exact names
  directly (unlike the sparsity modifiers' containers, see
  llmcompressor_wanda.py), so ``targets=["Linear"], ignore=["lm_head"]`` is
  exact. The script computes ``ignore`` as every Linear outside the decoder
  layers and verifies the result (see below).
* ``save_pretrained(save_compressed=False)`` logs a warning ("format dense
  does not match the inferred format pack-quantized"; harmless) and still
  writes a compressed-tensors
  ``quantization_config`` (format "dense") into config.json and the
  ``weight_scale`` / ``weight_zero_point`` tensors into the safetensors file;
  transformers then needs the ``compressed-tensors`` package to load it (and
  re-applies fake quantization). The project's venv does not have it, so after
  saving, this script strips the checkpoint to plain HF (drops the
  quantization_config and the extra tensors); the weights themselves are the
  fake-quantized (dequantized) GPTQ output, rounded to the model's original
  dtype (bfloat16 for the Shakespeare models), exactly as ``compress`` rounds
  its own output to the storage dtype.

Checks after ``oneshot`` (the script fails loudly otherwise): every decoder
Linear changed; every Linear / Embedding outside the decoder layers (lm_head,
the tied embeddings) is bit-identical; in every row, each group of group_size
weights has at most 2^bits distinct values; and the weights are fixed points
of compressed-tensors' fake quantization with the module's stored
scale/zero point.
"""

from __future__ import annotations

import argparse
import json
import os

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

QUANT_TENSOR_SUFFIXES = (".weight_scale", ".weight_zero_point", ".weight_g_idx", ".weight_global_scale")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_args(p)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dampening-frac", type=float, default=0.01)
    add_output_args(p, "dtype the model is loaded in for calibration and "
                       "evaluation (default float32, as compress on CPU). The "
                       "checkpoint is saved in the model's original dtype.")
    return p.parse_args(argv)


def max_distinct_per_group(w: torch.Tensor, group_size: int) -> int:
    rows, cols = w.shape
    if cols % group_size:
        raise SystemExit(f"in_features {cols} not divisible by group_size {group_size}")
    groups = w.reshape(rows, cols // group_size, group_size).sort(dim=-1).values
    distinct = 1 + (groups[..., 1:] != groups[..., :-1]).sum(dim=-1)
    return int(distinct.max())


def quantization_report(model, before, expected, bits, group_size):
    """Per-module checks after oneshot; returns (per_module, problems)."""
    from compressed_tensors.quantization import fake_quantize

    mods = dict(model.named_modules())
    per_module, problems = {}, []
    for name in expected:
        mod = mods[name]
        w = mod.weight.detach().float().cpu()
        w0 = before[name].float()
        distinct = max_distinct_per_group(w, group_size)
        info = {"changed": not torch.equal(w, w0), "max_distinct_per_group": distinct,
                "relative_change": float((w - w0).norm() / w0.norm())}
        if not info["changed"]:
            problems.append(f"{name}: decoder Linear was not modified")
        if distinct > 2 ** bits:
            problems.append(f"{name}: a group has {distinct} distinct values > 2^{bits}")
        scale = getattr(mod, "weight_scale", None)
        zero = getattr(mod, "weight_zero_point", None)
        args = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
        if scale is None or args is None:
            problems.append(f"{name}: no weight_scale / quantization scheme attached")
        else:
            requant = fake_quantize(mod.weight.detach(), scale.detach(),
                                    None if zero is None else zero.detach(), args)
            err = float((requant.float().cpu() - w).abs().max())
            info["requantize_max_abs_diff"] = err
            if err > 1e-6 * max(1.0, float(w.abs().max())):
                problems.append(f"{name}: weights are not on their stored grid (max diff {err:g})")
        per_module[name] = info
    for name, w0 in before.items():
        if name in per_module:
            continue
        if not torch.equal(w0, mods[name].weight.detach().cpu()):
            problems.append(f"{name}: outside the decoder layers but was modified")
    return per_module, problems


def strip_to_plain_checkpoint(out_dir: str) -> dict:
    """Drop compressed-tensors' quantization_config and qparam tensors: a plain HF checkpoint."""
    from safetensors.torch import load_file, save_file

    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    quant_config = config.pop("quantization_config", None)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    dropped = []
    for file in sorted(os.listdir(out_dir)):
        if not file.endswith(".safetensors"):
            continue
        path = os.path.join(out_dir, file)
        tensors = load_file(path)
        keep = {k: v for k, v in tensors.items() if not k.endswith(QUANT_TENSOR_SUFFIXES)}
        dropped += [k for k in tensors if k not in keep]
        if len(keep) != len(tensors):
            save_file(keep, path, metadata={"format": "pt"})
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            data = json.load(f)
        data["weight_map"] = {k: v for k, v in data["weight_map"].items()
                              if not k.endswith(QUANT_TENSOR_SUFFIXES)}
        with open(index, "w") as f:
            json.dump(data, f, indent=2)
    return {"quantization_config_removed": quant_config, "tensors_dropped": len(dropped)}


def main(argv=None):
    args = parse_args(argv)

    import compressed_tensors
    from llmcompressor.modifiers.gptq import GPTQModifier

    torch.manual_seed(0)
    tokens = load_calib_tokens(args.calib_tokens)
    tokenizer, model, orig_dtype = load_model(args)

    layer_classes = decoder_layer_classes(model)
    expected = layer_linear_names(model, layer_classes)
    outside = [name for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and name not in set(expected)]
    weights = {
        "num_bits": args.bits,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": args.group_size,
        "actorder": None,
        "observer": "memoryless_minmax",
    }
    config = {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": outside,
        "block_size": args.block_size,
        "dampening_frac": args.dampening_frac,
        "actorder": None,
    }
    modifier = GPTQModifier(**config)
    before = weight_snapshot(model)
    ds = calibration_dataset(tokens)

    dense_ppl = eval_perplexity(model, tokenizer, args, dense=True)
    model, seconds = run_oneshot(model, tokenizer, ds, modifier, tokens, layer_classes)

    # what actually got resolved (actorder, observer, ...), for the record
    resolved = {name: scheme.weights.model_dump(mode="json")
                for name, scheme in modifier.resolved_config.config_groups.items()}
    for name, w in resolved.items():
        if w.get("actorder") is not None:
            raise SystemExit(f"{name}: activation ordering {w['actorder']!r} is on")

    per_module, problems = quantization_report(model, before, expected, args.bits, args.group_size)
    for name, info in per_module.items():
        print(f"  {name:45s} distinct/group {info['max_distinct_per_group']:3d}  "
              f"rel. change {info['relative_change']:.4f}")
    print(f"modules quantized: {sum(i['changed'] for i in per_module.values())}/{len(expected)}; "
          f"untouched outside the decoder layers: {sorted(set(before) - set(expected))}")
    fail_on_problems(problems, "quantized module set / grid is not as configured")

    ppl = eval_perplexity(model, tokenizer, args, dense=False)

    os.makedirs(args.out, exist_ok=True)
    stripped = None
    if not args.no_save:
        # dense format: fake-quantized weights, which save_checkpoint casts to the model's
        # original dtype; then drop what compressed-tensors writes besides them
        save_checkpoint(model, tokenizer, args, orig_dtype)
        stripped = strip_to_plain_checkpoint(args.out)

    result = peer_result(args, seconds, {
        "modules": per_module,
        "config": {"modifier": "GPTQModifier", **config,
                   "resolved_weights": resolved,
                   **oneshot_record(tokens, layer_classes, args),
                   "saved_dtype": str(orig_dtype).removeprefix("torch.") if not args.no_save else None},
        "checkpoint": stripped,
    }, ppl, dense_ppl, compressed_tensors=compressed_tensors.__version__)
    write_result(args, result, ("tool", "version", "seconds", "perplexity"))


if __name__ == "__main__":
    main()
