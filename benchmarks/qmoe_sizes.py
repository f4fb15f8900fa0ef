"""QMoE on MoE shapes with realistic expert widths: bits/param of the experts counted from the bytes of
packed/, with the adaptive dictionary the export stores and with the reference's static one.

The shipped MoE model has 128-wide rows, where per-row metadata alone costs 0.2-0.5 bits a weight;
this builds random-weight models from a transformers config (2 layers, real expert widths), saves them
with the shipped tokenizer, and runs recipes/qmoe-ternary.yaml (and, with --rounding, the same grid
without GPTQ) on each, calibrating on the shipped text:

    python benchmarks/qmoe_sizes.py --json benchmarks/results/qmoe_sizes-DATE.jsonl

Shapes (out x in of one expert's projections):
  mixtral-like     hidden 1024, expert intermediate 3584, 8 experts, top-2  (gate_up 7168x1024, down 1024x3584)
  qwen2-moe-like   hidden 2048, expert intermediate 1408, 16 experts, top-4, a shared expert (gate_up 2816x2048, down 2048x1408)
  (Mixtral-8x7B itself is 4096 / 14336; the widths above keep a CPU run within minutes: the bits/param
  of the format depend on the row width and the symbol statistics, not on the number of experts.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import compress

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "mixtral-like": ("mixtral", dict(hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2,
                                     num_attention_heads=8, num_key_value_heads=4)),
    "qwen2-moe-like": ("qwen2_moe", dict(hidden_size=2048, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                         intermediate_size=5632, num_experts=16, num_experts_per_tok=4, num_attention_heads=16,
                                         num_key_value_heads=16)),
}


def build_model(shape: str, folder: Path) -> Path:
    """A random-weight 2-layer model of the named shape (initialised as transformers does), saved in bf16."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compress.model.load import embedded_model_path

    model_type, sizes = SHAPES[shape]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=8192, num_hidden_layers=2, max_position_embeddings=512,
                                  tie_word_embeddings=True, **sizes)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(folder)
    return folder


def measure(shape: str, model: Path, out: Path, rounding: bool) -> dict:
    overrides = [f"model.source={model}", "evaluate.max_windows=16", "calibration.nsamples=64"]
    if rounding:
        overrides.append("stages.0.rounding_only=true")
    started = time.perf_counter()
    report = compress.run(ROOT / "recipes" / "qmoe-ternary.yaml", out=out, track=False, overrides=overrides)
    metrics = report["metrics"]
    experts = [t for t in report["targets"].values() if t["fused_expert"]]
    tokens = [t["calibration_tokens"] or 0 for t in experts]
    return {"shape": shape, "method": "rtn-ternary" if rounding else "qmoe-ternary",
            "expert_params": sum(t["shape"][0] * t["shape"][1] for t in experts),
            "expert_bits_per_param": round(metrics["expert_bits_per_param"], 4),
            "expert_bits_per_param_static_dictionary": round(metrics["expert_bits_per_param_static_dictionary"], 4),
            "bits_per_param": round(metrics["bits_per_param"], 4), "formats": report["formats"],
            "expert_zero_share": round(_zero_share(out), 4),
            "tokens_per_expert_min": min(tokens), "tokens_per_expert_max": max(tokens),
            "perplexity": round(metrics["perplexity"], 2), "verify_ok": metrics.get("verify_ok"),
            "seconds": round(time.perf_counter() - started, 1)}


def _zero_share(out: Path) -> float:
    """Share of the expert weights stored as 0, from the packed symbols (symbol counts of each target)."""
    from compress.deploy.packed_model import read_quantization_config
    from compress.model.checkpoint import CheckpointFiles

    folder = out / "packed"
    layout = read_quantization_config(folder)["targets"]
    files = CheckpointFiles(folder)
    zeros = total = 0
    for name, info in layout.items():
        if info["format"] != "ternary_dict" or f"{name}.symbol_counts" not in files.where:
            continue
        counts = files.read([f"{name}.symbol_counts"])[f"{name}.symbol_counts"].double()
        pairs = torch.tensor([[a == 0, b == 0] for b in range(3) for a in range(3)], dtype=torch.float64)  # pair s = a + 3 b
        zeros += float((counts[:, None] * pairs).sum())
        total += float(counts.sum() * 2)
    return zeros / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rounding", action="store_true", help="also the round-to-nearest baseline in the same grid and format")
    parser.add_argument("--json", help="append one JSON record per (shape, method) to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compress-qmoe-") as scratch:
        for shape in args.shapes.split(","):
            model = build_model(shape, Path(scratch) / shape)
            for rounding in (False, True) if args.rounding else (False,):
                row = measure(shape, model, Path(scratch) / f"{shape}-{rounding}", rounding)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as handle:
                        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
