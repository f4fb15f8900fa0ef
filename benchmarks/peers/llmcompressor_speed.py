#!/usr/bin/env python
"""Peer timing: llm-compressor's ``oneshot`` on a random LLaMA, for benchmarks/peer_speed.py.

Run with the *peer* environment's python (see benchmarks/peers/README.md), one method per process:

    /tmp/llmc/bin/python benchmarks/peers/llmcompressor_speed.py --method wanda|sparsegpt|gptq \\
        --config CONFIG.json --calib-tokens TOKENS.pt --batch-size 8 --device cuda --json OUT.json

CONFIG.json is the LlamaConfig the driver built its own model from; the model is built from it the
way the driver builds its own (benchmarks/pruning_speed.py, random_llama_7b: torch.manual_seed(SEED),
bf16 weights drawn on the GPU when --device is cuda, then moved to host memory), so both sides get
the same weights (``weights_fingerprint`` in both records lets one check that). Building it is timed
apart (``load_seconds``) and left out of ``seconds``, which times the ``oneshot`` call alone (with a
CUDA synchronize on both sides). TOKENS.pt is a LongTensor [nsamples, seqlen]: exactly those rows, in
order, are the calibration data (no shuffling, no re-tokenisation). With --warmup the same method
first runs once, untimed, on a one-layer model of the same width and the first batch, so that what
only a first call pays (lazy imports, the CUDA libraries' handles) stays out of ``seconds``, as the
driver does for ours.

The modifiers (sparsity 0.5 unstructured, or the W4A16 preset) and why targets are what they are:

* ``WandaPruningModifier`` / ``SparseGPTModifier(sparsity=0.5, mask_structure="0:0",
  targets=[decoder layer class], ignore=["re:.*lm_head"])``: the sparsity modifiers' targets are
  the *containers* whose Linears get pruned; the default ``["Linear"]`` prunes lm_head too and a
  plain string prunes nothing (llmcompressor_wanda.py's docstring has the details). SparseGPT keeps
  its defaults, blocks of 128 columns and damping 1% of the mean Hessian diagonal, as ours.
* ``GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"])``: int4, symmetric, groups
  of 128, min/max grids fitted once per group before the sweep (static groups), blocks of 128,
  damping 0.01, and the modifier's default activation ordering, which resolves to "static"
  (columns swept by decreasing Hessian diagonal). What was resolved is written into the record.

``oneshot`` is called with ``sequential_targets=[decoder layer class]`` (what the pipeline infers
anyway) and its defaults otherwise: the "independent" pipeline, which picks the sequential one for
these modifiers; the model stays where it was loaded (host memory, as ``from_pretrained`` without a
``device_map`` leaves it) and each decoder layer is onloaded to llm-compressor's main device (the
first GPU, or the CPU without one) while its calibration runs; the activations between layers are
offloaded to ``sequential_offload_device`` ("cpu"); no prefetch; error propagation on. ``batch_size``
is the driver's (oneshot's own default is 1). A stand-in tokenizer is passed because ``oneshot``
insists on a processor whenever a dataset is given; the dataset is already tokenized, so it is
never used.

After ``oneshot`` the script checks, outside the timing, that the method did what it was asked: for
pruning every decoder Linear at >= 50% zeros, for GPTQ every decoder Linear carrying a W4A16 scheme
and its scales, for both the first and last decoder Linear changed and the embeddings and lm_head
untouched; it fails loudly otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

import torch
from peer_common import (  # first: it sets the offline switches before torch is imported
    calibration_dataset,
    decoder_layer_classes,
    fail_on_problems,
    layer_linear_names,
    load_calib_tokens,
)
from peer_common import run_oneshot as run_peer_oneshot  # run_oneshot here: the same, on a token tensor

METHODS = ("wanda", "sparsegpt", "gptq")
SPARSITY = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--config", required=True, help="the LlamaConfig as config.json (config.to_json_file); oneshot reads its folder too")
    p.add_argument("--calib-tokens", required=True, help="torch LongTensor [nsamples, seqlen] of input ids (.pt)")
    p.add_argument("--batch-size", type=int, default=1, help="oneshot's calibration batch size")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the weights are drawn")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: llm-compressor must find a GPU (its main device); cpu: run with CUDA_VISIBLE_DEVICES=''")
    p.add_argument("--warmup", action="store_true",
                   help="first run the method once, untimed, on a one-layer model of the same width and one batch")
    p.add_argument("--json", help="write the record here (it is printed either way)")
    return p.parse_args(argv)


def build_model(config_path: str, device: str, seed: int, layers: int | None = None):
    """The driver's random model: same config, same seed, weights drawn on the same device (`layers`:
    only that many decoder layers, for the warm-up)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(config_path)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(seed)
    with torch.device("cuda" if device == "cuda" else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    # oneshot re-reads the config from name_or_path (to refuse models quantized in other formats),
    # as for a model loaded with from_pretrained(folder): point it at the folder of the config
    model.config.name_or_path = os.path.dirname(os.path.abspath(config_path))
    return model.eval().to("cpu")


def weights_fingerprint(model) -> list[float]:
    """Sums of a few weights (the driver computes the same on its model): equal sums, same model."""
    layers = model.model.layers
    tensors = [model.model.embed_tokens.weight, layers[0].self_attn.q_proj.weight, layers[-1].mlp.down_proj.weight, model.lm_head.weight]
    return [round(float(t.detach().double().sum()), 6) for t in tensors]


def stand_in_tokenizer(vocab_size: int):
    """A fast tokenizer built in memory (no files): oneshot wants a processor beside a dataset."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", model_max_length=vocab_size)


def make_modifier(method: str, layer_classes: list[str]):
    """(modifier, its configuration as passed)."""
    if method in ("wanda", "sparsegpt"):
        config = {"sparsity": SPARSITY, "mask_structure": "0:0", "targets": layer_classes, "ignore": ["re:.*lm_head"]}
        if method == "wanda":
            from llmcompressor.modifiers.pruning import WandaPruningModifier as Modifier
        else:
            from llmcompressor.modifiers.pruning import SparseGPTModifier as Modifier
        return Modifier(**config), {"modifier": Modifier.__name__, **config}
    from llmcompressor.modifiers.gptq import GPTQModifier

    config = {"scheme": "W4A16", "targets": "Linear", "ignore": ["lm_head"]}
    return GPTQModifier(**config), {"modifier": "GPTQModifier", **config}


def modifier_settings(modifier, method: str) -> dict:
    """What the modifier ran with after oneshot resolved it (block size, damping, the weight scheme)."""
    settings = {name: getattr(modifier, name) for name in ("block_size", "dampening_frac", "batched_quantization") if hasattr(modifier, name)}
    if method == "gptq":
        settings["actorder"] = str(modifier.actorder)
        settings["resolved_weights"] = {name: scheme.weights.model_dump(mode="json")
                                        for name, scheme in modifier.resolved_config.config_groups.items()}
    return settings


def run_oneshot(model, tokenizer, tokens: torch.Tensor, modifier, batch_size: int, layer_classes: list[str], cuda: bool):
    """oneshot on exactly these rows, in order; (model, seconds), the seconds between CUDA synchronizes."""
    return run_peer_oneshot(model, tokenizer, calibration_dataset(tokens), modifier, tokens, layer_classes, batch_size, cuda)


def warm_up(args, tokens: torch.Tensor, tokenizer, layer_classes: list[str]) -> float:
    """The method once on a one-layer model and one batch, untimed: what a first call pays once
    (lazy imports, CUDA libraries' handles) is then paid. Seconds it took."""
    model = build_model(args.config, args.device, args.seed, layers=1)
    modifier, _ = make_modifier(args.method, layer_classes)
    _, seconds = run_oneshot(model, tokenizer, tokens[: args.batch_size], modifier, args.batch_size, layer_classes, args.device == "cuda")
    del model
    return seconds


def placement() -> dict:
    """Where oneshot ran things: its defaults, read from the installed llm-compressor."""
    from llmcompressor import oneshot
    from llmcompressor.utils.dev import get_main_device

    defaults = inspect.signature(oneshot).parameters
    return {
        "model_home": "cpu (host memory, as from_pretrained without a device_map)",
        "onload_device": str(get_main_device()),  # each decoder layer runs here, one at a time
        "pipeline": f"{defaults['pipeline'].default} (sequential for these modifiers)",
        "sequential_offload_device": defaults["sequential_offload_device"].default,  # activations between layers
        "sequential_prefetch": defaults["sequential_prefetch"].default,
        "dataloader_num_workers": defaults["dataloader_num_workers"].default,
    }


def check(model, method: str, expected: list[str], outside: dict[str, torch.Tensor], probes: dict[str, torch.Tensor]) -> dict:
    """Did the method do what it was asked? (sparsity or scheme per decoder Linear, the first and last
    of them changed; nothing else touched)."""
    modules = dict(model.named_modules())
    problems, sparsities = [], []
    for name, before in probes.items():
        if torch.equal(before, modules[name].weight.detach().cpu()):
            problems.append(f"{name}: decoder Linear was not modified")
    for name in expected:
        module = modules[name]
        if method == "gptq":
            weights = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if weights is None or getattr(module, "weight_scale", None) is None:
                problems.append(f"{name}: no quantization scheme / weight_scale attached")
            elif (weights.num_bits, weights.group_size, weights.symmetric) != (4, 128, True):
                problems.append(f"{name}: scheme is {weights.num_bits} bits, group {weights.group_size}, symmetric {weights.symmetric}")
        else:
            sparsity = float((module.weight == 0).float().mean())
            sparsities.append(sparsity)
            if sparsity + 1e-3 < SPARSITY:
                problems.append(f"{name}: sparsity {sparsity:.4f} < {SPARSITY}")
    for name, before in outside.items():
        module = modules[name]
        if not torch.equal(before, module.weight.detach().cpu()):
            problems.append(f"{name}: outside the decoder layers but was modified")
        if getattr(module, "quantization_scheme", None) is not None:
            problems.append(f"{name}: outside the decoder layers but got a quantization scheme")
    fail_on_problems(problems, f"{method}: llm-compressor did not compress exactly the decoder-layer Linears as asked")
    summary = {"decoder_linears": len(expected), "changed": sorted(probes), "untouched": sorted(outside)}
    if sparsities:
        summary["min_sparsity"], summary["max_sparsity"] = round(min(sparsities), 4), round(max(sparsities), 4)
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this environment's torch sees no GPU (a CPU-only build, or no GPU visible)")
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu but a GPU is visible: llm-compressor would use it; run with CUDA_VISIBLE_DEVICES=''")

    import compressed_tensors
    import llmcompressor
    import transformers

    tokens = load_calib_tokens(args.calib_tokens)
    nsamples, seqlen = tokens.shape
    start = time.perf_counter()
    model = build_model(args.config, args.device, args.seed)
    load_seconds = time.perf_counter() - start
    fingerprint = weights_fingerprint(model)

    layer_classes = decoder_layer_classes(model)
    expected = layer_linear_names(model, layer_classes)
    outside = {name: module.weight.detach().to("cpu", copy=True) for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and name not in set(expected)}
    probes = {name: dict(model.named_modules())[name].weight.detach().to("cpu", copy=True) for name in (expected[0], expected[-1])}
    modifier, config = make_modifier(args.method, layer_classes)
    tokenizer = stand_in_tokenizer(model.config.vocab_size)
    where = placement()
    warmup_seconds = warm_up(args, tokens, tokenizer, layer_classes) if args.warmup else None

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, seconds = run_oneshot(model, tokenizer, tokens, modifier, args.batch_size, layer_classes, args.device == "cuda")
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None

    summary = check(model, args.method, expected, outside, probes)
    record = {
        "method": args.method,
        "seconds": round(seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "warmup_seconds": None if warmup_seconds is None else round(warmup_seconds, 2),
        "peak_gib": None if peak is None else round(peak, 2),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "config": {**config, **modifier_settings(modifier, args.method)},
        "oneshot": {"num_calibration_samples": nsamples, "max_seq_length": seqlen, "shuffle_calibration_samples": False,
                    "batch_size": args.batch_size, "sequential_targets": layer_classes, "dtype": "bfloat16"},
        "placement": where,
        "check": summary,
        "weights_fingerprint": fingerprint,
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "python": sys.executable,
    }
    text = json.dumps(record, indent=2, default=str)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    print(json.dumps({k: record[k] for k in ("method", "seconds", "load_seconds", "peak_gib", "device")}), flush=True)


if __name__ == "__main__":
    main()
