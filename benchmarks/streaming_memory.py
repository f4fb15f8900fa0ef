"""Peak memory of a stage on a model larger than the memory it is given (issue 8.4): a LLaMA-7B-shaped
bf16 checkpoint with random weights (~13.5 GB on disk, one shard per block) is compressed through the
real steps (load -> calibrate -> stage), the stage streaming one block at a time from the shards.

    # once: write the model (random N(0, 0.02) weights, seeded; ~13.5 GB)
    python benchmarks/streaming_memory.py make-model /tmp/llama7b-random
    # the measurement: peak RSS of the whole process, by /usr/bin/time -v and by getrusage
    /usr/bin/time -v python benchmarks/streaming_memory.py compress /tmp/llama7b-random \\
        --method wanda --nsamples 4 --seqlen 128 --json docs/results/streaming-7b-cpu.json
    # GPU (device tool): peak GPU memory, one block resident
    python benchmarks/streaming_memory.py compress /tmp/llama7b-random --device cuda ...

Only the stage streams: evaluating or exporting a model this size loads it whole, so this runs the
steps up to the stage, into a scratch step store that it removes afterwards (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from compress.model.load import embedded_model_path


def make_model(folder: Path, layers: int = 32, seed: int = 0) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.calibration.streaming import parameters_on_meta
    from compress.model.checkpoint import CheckpointWriter, unique_tensors
    from compress.model.targets import find_blocks

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    with parameters_on_meta():
        skeleton = LlamaForCausalLM(config)
    blocks_path, blocks = find_blocks(skeleton)
    generator = torch.Generator().manual_seed(seed)

    def fill(named: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in named.items():
            if name.endswith("norm.weight"):
                out[prefix + name] = torch.ones(tensor.shape, dtype=torch.bfloat16)
            else:
                out[prefix + name] = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
        return out

    writer = CheckpointWriter(folder, len(blocks))
    for index, block in enumerate(blocks):
        writer.write(index + 1, fill(unique_tensors(block), f"{blocks_path}.{index}."))
        print(f"block {index + 1}/{len(blocks)}", flush=True)
    outside = {k: v for k, v in unique_tensors(skeleton).items() if not k.startswith(f"{blocks_path}.")}
    writer.write(0, fill(outside))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(folder)
    writer.finish(folder)


def compress(args: argparse.Namespace) -> dict:
    from compress.pipeline.calibrate import calibrate_step
    from compress.pipeline.load import load_step
    from compress.pipeline.stage import stage_step
    from compress.pipeline.store import StepStore
    from compress.recipe import validate_recipe

    stage = {"method": args.method, **json.loads(args.params)}
    recipe = validate_recipe({
        "model": {"source": str(args.model), "device": args.device, "kind": "causal"},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": min(args.nsamples, 8)},
        "stages": [stage],
        "evaluate": {"layer_error": args.layer_error},
        "output": {"onnx": False},
    }, name="streaming-memory")
    scratch = Path(args.steps or tempfile.mkdtemp(prefix="compress-streaming-"))
    store = StepStore(scratch)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        load = load_step(recipe)
        calibration = calibrate_step(store, recipe, load)
        result = stage_step(store, recipe, 0, load, calibration)
        seconds = time.perf_counter() - started
        output_bytes = sum(f.stat().st_size for f in result.model_path.glob("*.safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    model_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "model": f"random LLaMA-7B shape ({json.loads((args.model / 'config.json').read_text())['num_hidden_layers']} blocks of 4096 x 11008, bf16)",
        "model_bytes_on_disk": model_bytes,
        "output_bytes_on_disk": output_bytes,
        "stage": stage,
        "streamed": result.info["streamed"],
        "calibration_tokens": f"{args.nsamples} x {args.seqlen}",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "peak_rss_bytes": peak_rss,
        "peak_rss_over_model_size": round(peak_rss / model_bytes, 4),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
        "seconds_load_calibrate_stage": round(seconds, 1),
        "stage_seconds": round(result.info["stage_seconds"], 1),
        "sparsity": result.info["sparsity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-model")
    make.add_argument("folder", type=Path)
    make.add_argument("--layers", type=int, default=32, help="decoder blocks (32 for LLaMA-7B; fewer for a layer stack)")
    run = commands.add_parser("compress")
    run.add_argument("model", type=Path)
    run.add_argument("--method", default="wanda")
    run.add_argument("--params", default='{"sparsity": 0.5}', help="the stage's parameters as JSON")
    run.add_argument("--nsamples", type=int, default=4)
    run.add_argument("--seqlen", type=int, default=128)
    run.add_argument("--device", default="cpu")
    run.add_argument("--layer-error", action="store_true", help="also measure per-layer error (gathers X^T X)")
    run.add_argument("--steps", help="step store folder (default: a temporary one)")
    run.add_argument("--keep", action="store_true")
    run.add_argument("--json")
    args = parser.parse_args()
    if args.command == "make-model":
        make_model(args.folder, args.layers)
        return
    result = compress(args)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "command": "see benchmarks/streaming_memory.py"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
