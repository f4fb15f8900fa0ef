"""Wall time of pruning recipes through the layer-wise engine, side by side in one process: a real
model, or a LLaMA-7B-shaped model with random weights (the time does not depend on the values).
Each method chain starts from the same dense weights; `a+b` runs stage b after stage a in the same
block-wise pass (e.g. `wanda+dsnot`), so `wanda+dsnot` minus `wanda` is DSnoT's overhead.

    # CPU, the 7M model, 128 x 256 calibration tokens
    python benchmarks/pruning_speed.py --model ../shared/models/shakespeare-llama-7m --nsamples 128 --seqlen 256 \
        --methods 'wanda;wanda+dsnot;sparsegpt'
    # GPU, LLaMA-7B shape (32 x 4096, bf16), 128 x 2048 calibration tokens; blocks live in CPU memory
    # and move to the GPU one at a time
    python benchmarks/pruning_speed.py --random-llama-7b --nsamples 128 --seqlen 2048 --device cuda \
        --methods 'wanda;wanda+dsnot;sparsegpt'
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from quant_table import parse_config

from compress.calibration.data import batches
from compress.calibration.layerwise import PlannedStage, run_layerwise
from compress.calibration.model_statistics import MODEL_STATISTICS
from compress.methods import get_method
from compress.model.load import load_model
from compress.model.targets import discover
from compress.recipe import ModelSpec
from compress.state import CompressionState


def llama_config(layers: int = 32, hidden: int = 4096, intermediate: int = 11008, heads: int = 32, vocab: int = 32000):
    """A LlamaConfig of LLaMA-7B's shape by default (32 x 4096, MLP 11008, 32 heads, vocabulary 32000)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096)


def random_llama_7b(device: torch.device, config=None, seed: int | None = None) -> torch.nn.Module:
    """A LLaMA with random bf16 weights in host memory: LLaMA-7B's shape unless `config` (llama_config)
    says otherwise. The weights are drawn on the GPU when `device` is one (faster), after
    torch.manual_seed(seed) when a seed is given."""
    from transformers import LlamaForCausalLM

    config = config if config is not None else llama_config()
    init_device = device if device.type == "cuda" else torch.device("cpu")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(init_device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval().to("cpu")  # home is host memory: the engine moves one block at a time


def plan(chain: str, pattern: str, layout) -> list[PlannedStage]:
    """Stages of a chain like `wanda+dsnot` or `gptq:bits=3,group_size=128` (quant_table's syntax); a
    pruning method without parameters prunes to `pattern` (50% when unstructured)."""
    stages = []
    for config in parse_config(chain):
        name = config.pop("method")
        method_class = get_method(name)
        if not config and "sparsity" in method_class.Params.model_fields:
            config = {"sparsity": None if ":" in pattern else 0.5, "pattern": pattern}
        method = method_class(method_class.Params(**config))
        if method.refines_mask:
            method.bind_mask_pattern(pattern)
        stages.append(PlannedStage(method, method.restrict_targets(layout.targets), label=name))
    return stages


def whole_model_statistics(model: torch.nn.Module, stages: list[PlannedStage], calibration: list[torch.Tensor], device: torch.device) -> float | None:
    """Compute the whole-model statistics the stages name (SqueezeLLM's Fisher diagonal: gradients through every
    block, the whole model on `device`), kept in memory for the pass as the stage step keeps them on disk; the
    model goes back home afterwards, outside the time returned (None: no stage names one)."""
    home = next(model.parameters()).device
    begin, computed = time.perf_counter(), False
    for stage in stages:
        values: dict[str, dict[str, torch.Tensor]] = {}
        for name in (n for n in stage.method.statistics if n in MODEL_STATISTICS):
            for target, tensor in MODEL_STATISTICS[name].compute(model, stage.targets, calibration, device).items():
                values.setdefault(target, {})[name] = tensor
            computed = True
        stage.model_statistics = values or None
    if not computed:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = round(time.perf_counter() - begin, 2)
    model.to(home)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model")
    source.add_argument("--random-llama-7b", action="store_true")
    parser.add_argument("--methods", default="wanda", help="method chains separated by ';', e.g. 'wanda;wanda+dsnot;gptq:bits=3'")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--blocks", type=int, help="compress only the first N blocks (time per block x all blocks estimates the whole)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--forward-groups", default="auto",
                        help="calibration batches a forward takes, comma-separated to run each chain with each: 'auto,1'")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    start = time.perf_counter()
    if args.random_llama_7b:
        model = random_llama_7b(device)
        vocab = model.config.vocab_size
    else:
        loaded = load_model(ModelSpec(source=args.model, device=str(device)))
        model, vocab = loaded.model, loaded.model.config.vocab_size
    load_seconds = time.perf_counter() - start
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layout = discover(model)
    tokens = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    runs = {}
    groups = [None if g == "auto" else int(g) for g in args.forward_groups.split(",")]
    for chain, group in ((c, g) for c in args.methods.split(";") for g in groups):
        label = chain if len(groups) == 1 else f"{chain} (forward group {group or 'auto'})"
        model.load_state_dict(dense)
        stages = plan(chain, args.pattern, layout)
        if args.blocks:
            for stage in stages:
                stage.targets = [t for t in stage.targets if t.block < args.blocks]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        begin = time.perf_counter()
        model_statistics_seconds = whole_model_statistics(model, stages, batches(tokens, args.batch_size), device)
        outcome = run_layerwise(model, layout, stages, CompressionState(), batches(tokens, args.batch_size), device, forward_group=group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs[label] = {
            "seconds": round(time.perf_counter() - begin, 2),
            "model_statistics_seconds": model_statistics_seconds,
            "placement": outcome.placement,
            "forward_group": outcome.forward_group,
            "stage_seconds": [round(result.seconds, 2) for result in outcome.stages],
            "forward_seconds": round(outcome.forward_seconds, 2),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        }
        print(label, json.dumps(runs[label]), flush=True)
    if "wanda" in runs and "wanda+dsnot" in runs:
        runs["dsnot_overhead_over_wanda"] = round(runs["wanda+dsnot"]["seconds"] / runs["wanda"]["seconds"], 3)
    result = {
        "model": args.model or "random LLaMA-7B shape (32 x 4096, bf16)",
        "params": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "calibration_tokens": f"{args.nsamples} x {args.seqlen}",
        "blocks_compressed": args.blocks or len(layout.blocks),
        "blocks": len(layout.blocks),
        "pattern": args.pattern,
        "runs": runs,
        "load_seconds": round(load_seconds, 2),
        "targets": len(layout.targets),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
