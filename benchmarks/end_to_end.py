"""End-to-end decoding speed on the CPU kernels: tokens/s at batch 1 (greedy generate, a fixed prompt,
N new tokens, after a warm-up generate of the same length; the median of a few timed runs), dense vs compressed, all cores.

(a) the shipped shakespeare-llama-7m (bf16): dense bf16 and fp32, then each of recipes/wanda-2of4,
    rtn-4bit, spqr-3bit and squeezellm-3bit run end to end by `compress.run` (output.hf: true), its
    packed/ folder loaded by `compress.load` (kernel-backed modules, the config's bf16 activations) and,
    beside it, its model/ folder: the evaluated dense checkpoint, the same (dequantized) weights in
    dense bf16 Linear layers.
(b) a ~1B LLaMA-shaped model with random weights (hidden 2048, intermediate 5504, 16 layers, 16 heads,
    vocab 32000; 0.94B parameters) saved in bf16: dense bf16 and fp32, then every Linear of the decoder
    layers compressed directly, without the pipeline: 2:4 by magnitude, RTN int4 g128, and 2:4 then RTN
    int4 g128 (compress.methods.sparsity.prune_mask, compress.methods.rtn pure functions -> a
    CompressionState), the dense-equivalent checkpoint saved with save_pretrained (model/) and the
    packed folder written by compress.deploy.packed_model.write_packed_model (packed/), loaded by
    compress.load.

Every compressed row says whether its greedy tokens equal those of its dense equivalent (model/: the
same weights, rounded to the checkpoint's bf16 where they are dequantized codes, in dense Linear
layers, bf16 activations) and where they first differ. Ratios are speedups over dense bf16 and dense
fp32 of the same model. Work folders (recipe outputs, the 1B checkpoints, about 10 GB) are kept under
--work and reused.

    python benchmarks/end_to_end.py --quick     # the shipped model only
    python benchmarks/end_to_end.py --json      # both; the JSON document on stdout, the table on stderr
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

SHIPPED = Path("/work/shared/models/shakespeare-llama-7m")
RECIPES = ["wanda-2of4", "rtn-4bit", "spqr-3bit", "squeezellm-3bit"]
REPO = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
FORMS_1B = ["2:4", "int4_g128", "2:4+int4_g128"]


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def decode(model, input_ids: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, list[int], list[float]]:
    """(median tokens/s, the generated ids, every run's tokens/s): greedy, exactly `new_tokens` new tokens."""
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, attention_mask=torch.ones_like(input_ids),
                  pad_token_id=0, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        # warm-up of the same length: oneDNN builds a primitive per new shape (the KV cache grows every token)
        model.generate(input_ids, **kwargs)
        rates, ids = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.generate(input_ids, **kwargs)
            rates.append(new_tokens / (time.perf_counter() - started))
            ids = out[0, input_ids.shape[1]:].tolist()
    return statistics.median(rates), ids, rates


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def packed_formats(out: Path) -> dict[str, int]:
    """{format: how many targets} of a packed folder (dense: targets it kept dense)."""
    section = json.loads((out / "packed" / "config.json").read_text())["quantization_config"]
    counts: dict[str, int] = {}
    for info in section["targets"].values():
        name = info["format"] + (f" {info['pattern']}" if "pattern" in info else "")
        counts[name] = counts.get(name, 0) + 1
    if section.get("dense_targets"):
        counts["dense"] = len(section["dense_targets"])
    return counts


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


class Bench:
    """Times models of one family on one prompt and keeps the rows."""

    def __init__(self, family: str, input_ids: torch.Tensor, new_tokens: int, repeats: int):
        self.family, self.input_ids, self.new_tokens, self.repeats = family, input_ids, new_tokens, repeats
        self.rows: list[dict] = []
        self.tokens: dict[str, list[int]] = {}

    def time(self, name: str, load, **extra) -> dict:
        from compress.kernels.modules import PackedLinear

        started = time.perf_counter()
        model = load()
        loaded = time.perf_counter() - started
        rate, ids, rates = decode(model, self.input_ids, self.new_tokens, self.repeats)
        row = {"model": self.family, "variant": name, "tokens_per_s": rate, "runs_tokens_per_s": rates, "new_tokens": self.new_tokens,
               "prompt_tokens": int(self.input_ids.shape[1]), "load_seconds": loaded,
               "kernel_modules": sum(isinstance(m, PackedLinear) for m in model.modules()),
               "activations": str(next(model.parameters()).dtype).removeprefix("torch."), "load_average_1min": os.getloadavg()[0], **extra}
        equivalent = extra.get("dense_equivalent")
        if equivalent in self.tokens:
            row["same_tokens"] = ids == self.tokens[equivalent]
            row["first_difference"] = first_difference(ids, self.tokens[equivalent])
        self.tokens[name] = ids
        row["tokens"] = ids
        self.rows.append(row)
        same = f"  same tokens as {equivalent}: {row['same_tokens']}" if "same_tokens" in row else ""
        say(f"  {self.family:22s} {name:28s} {rate:8.2f} tok/s{same}")
        del model
        return row

    def finish(self) -> list[dict]:
        """The rows, each with its speedup over dense bf16 and dense fp32."""
        for base in ("dense_bf16", "dense_fp32"):
            rate = next(r["tokens_per_s"] for r in self.rows if r["variant"] == base)
            for row in self.rows:
                row[f"ratio_vs_{base}"] = row["tokens_per_s"] / rate
        return self.rows


def dense_loader(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def packed_loader(out: Path, dtype: torch.dtype | None = None):
    import compress

    return lambda: compress.load(out, dtype=dtype)


# ---------------------------------------------------------------- (a) the shipped model and its recipes

def recipe_output(stem: str, work: Path) -> Path:
    """OUT of `compress.run` of recipes/<stem>.yaml on the shipped model (model/ written too), run once."""
    import compress

    out = work / "shakespeare" / stem
    if (out / "packed" / "config.json").is_file() and (out / "model" / "config.json").is_file():
        return out
    recipe = yaml.safe_load((REPO / "recipes" / f"{stem}.yaml").read_text())
    recipe["name"] = stem
    recipe["output"] = {**recipe.get("output", {}), "hf": True}
    say(f"running recipes/{stem}.yaml on {SHIPPED.name} -> {out}")
    started = time.perf_counter()
    compress.run(recipe, model=SHIPPED, out=out, track=False, overwrite=True)
    say(f"  {time.perf_counter() - started:.0f} s")
    return out


def shipped(work: Path, new_tokens: int, repeats: int) -> list[dict]:
    from transformers import AutoTokenizer

    outputs = {stem: recipe_output(stem, work) for stem in RECIPES}
    ids = AutoTokenizer.from_pretrained(SHIPPED)(PROMPT, return_tensors="pt").input_ids
    bench = Bench(SHIPPED.name, ids, new_tokens, repeats)
    bench.time("dense_bf16", dense_loader(SHIPPED, torch.bfloat16), weight_bytes=folder_bytes(SHIPPED))
    bench.time("dense_fp32", dense_loader(SHIPPED, torch.float32))
    for stem, out in outputs.items():
        bench.time(f"{stem} dense-equivalent", dense_loader(out / "model", torch.bfloat16), weight_bytes=folder_bytes(out / "model"))
        bench.time(f"{stem} packed", packed_loader(out), dense_equivalent=f"{stem} dense-equivalent", formats=packed_formats(out),
                   weight_bytes=folder_bytes(out / "packed"))
    return bench.finish()


# ---------------------------------------------------------------- (b) a ~1B LLaMA with random weights

def targets_of(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name]


def compress_target(weight: torch.Tensor, form: str):
    """(mask or None, QuantizedWeight or None, the dense-equivalent fp32 weight) of one [out, in] weight."""
    from compress.methods.quantization import packed_weight
    from compress.methods.rtn import rtn_quantize
    from compress.methods.sparsity import prune_mask

    weight = weight.float()
    mask = None
    if form.startswith("2:4"):
        mask = prune_mask(weight.abs(), 0.5, "2:4")
    elif form.startswith("unstructured"):  # unstructured{sparsity %}[+int4_g128]: magnitude, that share pruned
        mask = prune_mask(weight.abs(), int(form[len("unstructured"):].split("+")[0]) / 100, "unstructured")
    if mask is not None:
        weight = weight * mask
    if "int4" not in form:
        return mask, None, weight
    quantized, grids = rtn_quantize(weight, 4, 128)
    packed = packed_weight(quantized, grids, 4, 128, keep=mask)
    return mask, packed, packed.dequantize()


def build_1b(work: Path) -> tuple[Path, dict[str, Path]]:
    """The dense bf16 checkpoint (work/llama-1b/dense) and, per form, OUT with model/ and packed/ (built once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.deploy.packed_model import write_packed_model
    from compress.state import CompressionState

    root = work / "llama-1b"
    dense = root / "dense"
    if not (dense / "config.json").is_file():
        say(f"building the random ~1B LLaMA -> {dense}")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, dtype="bfloat16")).to(torch.bfloat16)
        model.save_pretrained(dense)
        del model
    outs = {}
    for form in FORMS_1B:
        out = root / form.replace(":", "of").replace("+", "-")
        outs[form] = out
        if (out / "packed" / "config.json").is_file():
            continue
        say(f"compressing every decoder Linear: {form} -> {out}")
        started = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
        state = CompressionState()
        targets = targets_of(model)
        with torch.no_grad():
            for name in targets:
                linear = model.get_submodule(name)
                mask, quantized, equivalent = compress_target(linear.weight, form)
                entry = state.get(name)
                entry.mask, entry.quantized = mask, quantized
                linear.weight.copy_(equivalent.to(torch.bfloat16))
        model.save_pretrained(out / "model")
        del model
        write_packed_model(out / "model", state, targets, out / "packed")
        say(f"  {time.perf_counter() - started:.0f} s")
    return dense, outs


def llama_1b(work: Path, new_tokens: int, repeats: int, fp32: bool = False) -> list[dict]:
    dense, outs = build_1b(work)
    ids = torch.randint(3, LLAMA_1B["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    bench = Bench("llama-1b-random", ids, new_tokens, repeats)
    bench.time("dense_bf16", dense_loader(dense, torch.bfloat16), weight_bytes=folder_bytes(dense))
    bench.time("dense_fp32", dense_loader(dense, torch.float32))
    for form, out in outs.items():
        bench.time(f"{form} dense-equivalent", dense_loader(out / "model", torch.bfloat16), weight_bytes=folder_bytes(out / "model"))
        bench.time(f"{form} packed", packed_loader(out), dense_equivalent=f"{form} dense-equivalent", formats=packed_formats(out),
                   weight_bytes=folder_bytes(out / "packed"))
        if fp32:  # the same weights computed in fp32: greedy tokens then differ only by summation order
            bench.time(f"{form} dense-equivalent fp32", dense_loader(out / "model", torch.float32))
            bench.time(f"{form} packed fp32", packed_loader(out, torch.float32), dense_equivalent=f"{form} dense-equivalent fp32",
                       formats=packed_formats(out))
    return bench.finish()


# ---------------------------------------------------------------- report

def machine() -> dict:
    from compress.kernels import build

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {"cpu": model, "threads": torch.get_num_threads(), "torch": torch.__version__, "kernels": build.cpu_features(),
            "kernel_build": build._build_name(build._sources()[1])}


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | tokens/s | vs dense bf16 | vs dense fp32 | checkpoint MiB | same tokens as dense-equivalent |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "" if "same_tokens" not in r else ("yes" if r["same_tokens"] else f"no (from token {r['first_difference']})")
        size = f"{r['weight_bytes'] / 2**20:.1f}" if "weight_bytes" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['tokens_per_s']:.2f} | {r['ratio_vs_dense_bf16']:.2f} | "
                     f"{r['ratio_vs_dense_fp32']:.2f} | {size} | {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the shipped model only")
    parser.add_argument("--json", action="store_true", help="print the JSON document on stdout (the table goes to stderr)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compress-e2e"), help="recipe outputs and 1B checkpoints (reused)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per generate, shipped model")
    parser.add_argument("--new-tokens-1b", type=int, default=16, help="new tokens per generate, 1B model")
    parser.add_argument("--repeats", type=int, default=3, help="timed generates per model (the median is reported)")
    parser.add_argument("--fp32", action="store_true", help="also each 1B form in fp32, packed against its dense equivalent: same tokens")
    args = parser.parse_args()
    rows = shipped(args.work, args.new_tokens, args.repeats)
    if not args.quick:
        rows += llama_1b(args.work, args.new_tokens_1b, max(2, args.repeats - 1), args.fp32)
    text = table(rows)
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"machine": machine(), "prompt": PROMPT, "llama_1b_config": LLAMA_1B, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
