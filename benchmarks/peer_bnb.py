"""bitsandbytes as a quantization baseline: NF4 and FP4 (blocks of 64, with and without double
quantization of the block scales) and LLM.int8 (with and without its fp16 outlier columns), on the
targets our pipeline quantizes, scored by our perplexity code on the same evaluation windows.

bits/param is counted from a file: the targets' bitsandbytes state (codes, block scales, the
double-quantization tables and bitsandbytes' serialized quantization state) written with safetensors,
its size in bits over the targets' weights. What bitsandbytes keeps only in memory (LLM.int8's outlier
columns are found again at run time) is not in the file.

    python benchmarks/peer_bnb.py --model ../shared/models/shakespeare-llama-7m \
        --eval ../shared/corpus/shakespeare-milton/eval.txt --json docs/results/quant-bnb-llama-7m.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors.torch import save_file
from torch import nn

from compress.calibration.data import read_text_file, tokenize
from compress.model.load import load_model
from compress.model.targets import discover
from compress.pipeline.metrics import eval_windows, perplexity
from compress.recipe import ModelSpec

CONFIGS = {
    "bnb nf4": {"kind": "4bit", "quant_type": "nf4", "compress_statistics": False},
    "bnb nf4, double quant": {"kind": "4bit", "quant_type": "nf4", "compress_statistics": True},
    "bnb fp4": {"kind": "4bit", "quant_type": "fp4", "compress_statistics": False},
    "bnb int8 (LLM.int8, threshold 6)": {"kind": "8bit", "threshold": 6.0},
    "bnb int8 (threshold 0: no outliers)": {"kind": "8bit", "threshold": 0.0},
}


def quantized(linear: nn.Linear, config: dict, device: torch.device) -> nn.Module:
    weight = linear.weight.detach()
    with torch.device("meta"):
        if config["kind"] == "4bit":
            module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=torch.float32,
                                       quant_type=config["quant_type"], compress_statistics=config["compress_statistics"])
        else:
            module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         has_fp16_weights=False, threshold=config["threshold"])
    if config["kind"] == "4bit":
        module.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=config["quant_type"],
                                          compress_statistics=config["compress_statistics"])
    else:
        module.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module.to(device)  # bitsandbytes quantizes on this move


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = ModelSpec(source=args.model, device="cpu", dtype="float32")
    loaded = load_model(spec)
    windows = eval_windows(tokenize(loaded.tokenizer, read_text_file(args.eval, "evaluation")), args.seqlen)
    dense = perplexity(loaded.model, windows, device)
    print(f"{'configuration':<40} {'perplexity':>10} {'bits/param':>10}  (dense {dense:.4f})")
    rows = []
    for name, config in CONFIGS.items():
        started = time.perf_counter()
        model = load_model(spec).model
        targets = discover(model).targets
        params = sum(t.module.weight.numel() for t in targets)
        for target in targets:
            parent, _, child = target.name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized(target.module, config, device))
        model.to(device)
        value = perplexity(model, windows, device)
        state = {}
        for target in targets:
            for key, tensor in model.get_submodule(target.name).state_dict().items():
                if key != "bias" and isinstance(tensor, torch.Tensor):
                    state[f"{target.name}.{key}"] = tensor.detach().contiguous().cpu()
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "targets.safetensors"
            save_file(state, str(path))
            bits = path.stat().st_size * 8 / params
        row = {"config": name, "perplexity": value, "bits_per_param": bits, "dense_perplexity": dense, "bitsandbytes": bnb.__version__,
               "torch": torch.__version__, "device": str(device), "seconds": time.perf_counter() - started, **config}
        rows.append(row)
        print(f"{name:<40} {value:>10.4f} {bits:>10.3f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"metric": "perplexity", "dense": dense, "rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
