"""Wanda wall time through the layer-wise engine: a real model, or a LLaMA-7B-shaped model with
random weights (the time does not depend on the values).

    # CPU, the 7M model, 128 x 256 calibration tokens
    python benchmarks/wanda_speed.py --model ../shared/models/shakespeare-llama-7m --nsamples 128 --seqlen 256
    # GPU, LLaMA-7B shape (32 x 4096, bf16), 128 x 2048 calibration tokens; blocks live in CPU memory
    # and move to the GPU one at a time
    python benchmarks/wanda_speed.py --random-llama-7b --nsamples 128 --seqlen 2048 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from compress.data import batches
from compress.engine import Stage, run_layerwise
from compress.methods.wanda import Wanda
from compress.modeling import load_model
from compress.recipe import ModelSpec
from compress.state import CompressionState
from compress.targets import discover


def random_llama_7b(device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    init_device = device if device.type == "cuda" else torch.device("cpu")
    with torch.device(init_device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval().to("cpu")  # home is host memory: the engine moves one block at a time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model")
    source.add_argument("--random-llama-7b", action="store_true")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--device", default="auto")
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
    layout = discover(model)
    tokens = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    method = Wanda(Wanda.Params(sparsity=None if ":" in args.pattern else 0.5, pattern=args.pattern))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    outcome = run_layerwise(model, layout, [Stage(method, layout.targets)], CompressionState(), batches(tokens, args.batch_size), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    params = sum(p.numel() for p in model.parameters())
    result = {
        "model": args.model or "random LLaMA-7B shape (32 x 4096, bf16)",
        "params": params,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "calibration_tokens": f"{args.nsamples} x {args.seqlen}",
        "pattern": args.pattern,
        "wanda_seconds": round(outcome.stages[0].seconds + outcome.forward_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "targets": len(layout.targets),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
