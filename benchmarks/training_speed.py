"""Tokens/s and peak memory of the training stages' steps against a plain dense training step, on one
model shape, in one run: what AdamS, the learnable scales and the teacher's forward pass cost, and
what an NF4 base saves sparse LoRA.

Rows, each through the same loop (compress/train/loop.py) on the same random-token batches:
  dense          AdamW, cross-entropy only (the plain training step)
  cast, no teacher   AdamS + weight scaling + the mask update every 10 steps, cross-entropy only
  cast           the above + the teacher's forward pass and the KL term (the full CAST step)
  lora           sparse LoRA, rank 16, CE + SquareHead from the teacher, over the fp32 base
  lora, nf4 base     the same over a bitsandbytes NF4 base (base_quantization: nf4)

Peak memory: on CUDA the allocator's peak for the row; on the CPU the process's peak resident set
(run one row per process with --only for a per-row number).

A random-weight LLaMA-shaped model (~1.1B parameters by default) is built from a `transformers`
config; on CUDA it trains in fp32 master weights under bf16 autocast, as the stage does.

    python benchmarks/training_speed.py --device cuda --json benchmarks/results/training_speed.jsonl
    python benchmarks/training_speed.py --device cpu --hidden 512 --intermediate 1408 --layers 4 --batch-size 4 \
        --seqlen 256 --steps 6 --only "lora, nf4 base"
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.methods.cast import CastParams, CastTask
from compress.methods.sparse_lora import LoraTask, SparseLoraParams
from compress.methods.training import TrainingParams, TrainingTask
from compress.model.targets import discover
from compress.state import CompressionState
from compress.train.data import PackedSequences
from compress.train.loop import train


def build(args: argparse.Namespace, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512), vocab_size=32000,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).float()
    return model


def measure(name: str, model: torch.nn.Module, task: TrainingTask, params: TrainingParams, data: PackedSequences,
            teacher: torch.nn.Module | None) -> dict:
    on_gpu = next(model.parameters()).device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if on_gpu else None  # model, teacher, frozen base: before any step
    result = train(model, task, params, data=data, teacher=lambda: teacher)
    later = [p["tokens_per_second"] for p in result.curve[1:]]  # the first interval holds the warm-up
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"row": name, "tokens_per_second": sum(later) / len(later), "final_loss": result.final_loss, "peak_gib": peak / 2**30,
           "resident_gib": resident, "peak_kind": "cuda allocator" if on_gpu else "process resident set"}
    held = f", {resident:.2f} GiB before the first step" if resident is not None else ""
    print(f"{name:<20} {row['tokens_per_second']:>12,.0f} tok/s   peak {row['peak_gib']:.2f} GiB{held}", flush=True)
    return row


def _release() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="run only these rows (their names as printed)")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    common = {"steps": args.steps, "seqlen": args.seqlen, "batch_size": args.batch_size, "warmup_steps": 2,
              "log_every": max(1, args.steps // 3), "checkpoint_every": 0}
    ids = torch.randint(0, 32000, (args.seqlen * args.batch_size * 4,), generator=torch.Generator().manual_seed(0))
    data = PackedSequences(ids, args.seqlen, seed=0)
    rows = []

    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    params_count = sum(p.numel() for p in build(args, torch.device("meta")).parameters())
    print(f"LLaMA-shaped, {params_count / 1e9:.2f}B parameters, batch {args.batch_size} x {args.seqlen} tokens, {device}")
    if wanted("dense"):
        rows.append(measure("dense", build(args, device), TrainingTask(), TrainingParams(**common), data, None))
    for name, kl in (("cast, no teacher", 0.0), ("cast", 1 / 3)):
        if not wanted(name):
            continue
        model = build(args, device)
        teacher = copy.deepcopy(model).to(torch.bfloat16 if device.type == "cuda" else torch.float32) if kl else None
        params = CastParams(**common, kl_weight=kl, ce_weight=1 - kl)
        task = CastTask(discover(model).targets, params, CompressionState())
        rows.append(measure(name, model, task, params, data, teacher))
        del model, teacher, task
        _release()
    for name, base in (("lora", "none"), ("lora, nf4 base", "nf4")):
        if not wanted(name):
            continue
        model = build(args, device)
        teacher = copy.deepcopy(model).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        params = SparseLoraParams(**common, base_quantization=base)
        task = LoraTask(model, discover(model).targets, params)
        _release()  # the full-precision weights the NF4 base replaced are on the CPU now
        rows.append(measure(name, model, task, params, data, teacher))
        del model, teacher, task
        _release()
    for row in rows:
        dense = rows[0]["tokens_per_second"] if rows[0]["row"] == "dense" else None
        row.update(ratio_to_dense=row["tokens_per_second"] / dense if dense else None, params=params_count, device=str(device),
                   gpu=torch.cuda.get_device_name() if device.type == "cuda" else None, torch=torch.__version__,
                   batch=args.batch_size, seqlen=args.seqlen, time=time.strftime("%Y-%m-%d %H:%M:%S"))
        if row["ratio_to_dense"] is not None:
            print(f"{row['row']:<20} {row['ratio_to_dense']:.2f}x the dense step's tokens/s")
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
