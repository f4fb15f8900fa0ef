"""End-to-end decoding on a GPU: a random-weight LLaMA-shaped model (~1B or 7B widths) generating N tokens
greedily at batch 1 and 16, dense bf16 against the same model with every decoder Linear replaced by a
kernel-backed module of a packed format (2:4, int4 g128, 2:4 + int4 g128, 50% unstructured + int4 g128, SpQR
3-bit g16 with 3-bit statistics and 1% outliers; `compress.kernels.modules`, the
modules `compress.load(out, device="cuda")` builds), both under CUDA graphs.

Decoding: transformers' model with a static KV cache; the prompt runs eagerly, then one decode step (forward,
argmax, the token written to the output and fed back, the position advanced) is captured in a CUDA graph and
replayed N - 1 times; tokens/s = batch * (N - 1) / the replays' time (median of --repeats runs, each from the
same first token). A model whose step cannot be captured is timed eagerly and says so (graphs: false).

Same weights, same tokens: each packed model is compared with its dense equivalent (the dense model with every
target's weight replaced by the packed weight decoded to bf16, the same graph decode): `same_tokens` and the
first position where the greedy tokens differ; then both models read the dense equivalent's sequence in one
forward (teacher forcing): the share of positions whose next-token argmax agrees, and how many disagreements lie
within the numerical noise (top-2 logit gap no larger than the largest logit difference at that position). Both
compute bf16 activations with fp32 accumulation in a different summation order: on random weights, whose
next-token distributions are nearly flat, a near-tie may flip. Compression is direct (no calibration: 2:4 and 50% by magnitude,
RTN int4 g128, spqr_target's grids), as benchmarks/end_to_end.py does on CPU.

    python3 benchmarks/gpu_decode.py --models 1b,7b --batches 1,16 --new-tokens 128 --json out.json
    python3 benchmarks/gpu_decode.py --models 1b,7b:8            # 7B widths, 8 of the 32 decoder layers
    python3 benchmarks/gpu_decode.py --models 7b:8 --forms spqr3_g16@three,spqr3_g16   # SpQR in three launches a layer / as dispatched
    (FORM@three: three launches at every batch; FORM@fused and FORM: the one-launch kernel up to 16 rows, as dispatched)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from end_to_end import compress_target, first_difference, targets_of

from compress.kernels import cuda_mma_extras, mma_extras_layout

MODELS = {
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}
FORMS = ("int4_g128", "2:4", "2:4+int4_g128", "unstructured50+int4_g128", "spqr3_g16")
PROMPT_TOKENS = 16


def rewind(cache, length: int) -> None:
    """Back to `length` cached tokens: newer transformers keep the write position in each static layer
    (`cumulative_length`, a device tensor advanced in place: captured by the graph), older ones take
    cache_position only."""
    for layer in getattr(cache, "layers", []):
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def build(name: str, layers: int | None, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(MODELS[name])
    if layers:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, new_tokens: int, repeats: int, graphs: bool = True) -> dict:
    """{tokens: [batch][new_tokens], tokens_per_s, runs, graphs[, graph_error]}: greedy decode of new_tokens."""
    from transformers import StaticCache

    batch, length = prompt.shape
    device = prompt.device
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens)
    logits = model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(length, device=device)).logits
    first = logits[:, -1].argmax(-1, keepdim=True)
    token, pos = first.clone(), torch.tensor([length], device=device)
    out = torch.zeros(batch, new_tokens, dtype=torch.long, device=device)
    out[:, :1] = first

    def step() -> torch.Tensor:
        positions = pos.view(1, 1).expand(batch, 1)
        return model(token, past_key_values=cache, use_cache=True, cache_position=pos, position_ids=positions).logits[:, -1].argmax(-1, keepdim=True)

    def advance() -> None:
        nxt = step()
        out.index_copy_(1, pos - length + 1, nxt)
        token.copy_(nxt)
        pos.add_(1)

    record: dict = {"graphs": False}
    run = advance
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if graphs and device.type == "cuda":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()  # compiles the kernels, sizes the workspaces; writes only the cache slot the first replay rewrites
            torch.cuda.current_stream().wait_stream(side)
            rewind(cache, length)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                advance()
            run, record["graphs"] = graph.replay, True
        except Exception as error:  # a step that syncs with the host or allocates unsafely: timed eagerly
            record["graph_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            sync()
    runs = []
    for _ in range(repeats):
        token.copy_(first)
        pos.fill_(length)
        rewind(cache, length)
        sync()
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            run()
        sync()
        runs.append(batch * (new_tokens - 1) / (time.perf_counter() - start))
    record.update(tokens=out.tolist(), tokens_per_s=round(sorted(runs)[len(runs) // 2], 1), runs=[round(r, 1) for r in runs])
    return record


def spqr_target(weight: torch.Tensor, bits: int = 3, group: int = 16, outlier_fraction: float = 0.01):
    """(None, QuantizedWeight, dense-equivalent fp32) of a SpQR-shaped weight without calibration: a random
    column permutation (as act-order leaves), min/max grids per group of 16 columns whose scales and zero points
    are themselves quantized to 3 bits in groups of 16 rows (`methods.spqr.quantize_statistic`), and the 1% of
    weights the grid rounds worst kept as float16 outliers."""
    from compress.formats.quantized import Outliers, QuantizedStatistic, QuantizedWeight
    from compress.methods.spqr import quantize_statistic

    rows, cols = weight.shape
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(rows + cols)).to(weight.device)
    w = weight.float()[:, perm]
    grouped = w.view(rows, cols // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-8)
    stats = []
    for values in (scale, -low / scale):
        parts = [quantize_statistic(values[:, j].contiguous(), 3, 16) for j in range(values.shape[1])]
        stats.append(QuantizedStatistic(torch.cat([p.codes for p in parts], 1), 3, 16, torch.cat([p.step for p in parts], 1),
                                        torch.cat([p.low for p in parts], 1)))
    s, z = stats[0].values()[..., None], stats[1].values()[..., None]
    codes = torch.clamp(torch.round(grouped / s + z), 0, 2**bits - 1)
    error = (grouped - s * (codes - z)).abs().view(rows, cols)
    where = error >= error.flatten().kthvalue(int(error.numel() * (1 - outlier_fraction))).values
    q = QuantizedWeight((rows, cols), bits, group, codes.view(rows, cols).to(torch.uint8), stats[0], stats[1], Outliers.from_mask(w, where),
                        perm=perm)
    return None, q, q.dequantize()


@torch.inference_mode()
def teacher_forced(model, sequence: torch.Tensor) -> torch.Tensor:
    """fp32 logits at the positions that predict the generated tokens, [batch, new_tokens, vocab] (one forward)."""
    return model(sequence, use_cache=False).logits[:, PROMPT_TOKENS - 1 : -1].float()


def compare_logits(packed: torch.Tensor, reference: torch.Tensor) -> dict:
    """How the packed model's next-token choices compare with its dense equivalent's on the same (the dense
    equivalent's) tokens: the share of positions whose argmax agrees, and whether every disagreement lies within
    the numerical noise (the reference's top-2 gap there no larger than the largest logit difference there)."""
    top2 = reference.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    difference = (packed - reference).abs().amax(-1)
    disagree = packed.argmax(-1) != reference.argmax(-1)
    return {"teacher_forced_agreement": round(1 - disagree.float().mean().item(), 4), "disagreements": int(disagree.sum()),
            "disagreements_within_noise": int((disagree & (gap <= difference)).sum()),
            "median_top2_gap": round(gap.median().item(), 5), "median_max_logit_difference": round(difference.median().item(), 5)}


def pack_all(model, targets: list[str], form: str) -> tuple[dict, dict, int]:
    """({target: kernel-backed module}, {target: dense-equivalent bf16 weight}, packed bytes) for one form."""
    from compress.formats.choose import pack_target
    from compress.formats.words import tensor_bytes
    from compress.kernels.modules import from_packed

    modules, equivalents, nbytes = {}, {}, 0
    compress = (lambda weight, _: spqr_target(weight)) if form.startswith("spqr") else compress_target
    where = None  # the packing device: the weight's, or the CPU where a packing step takes only CPU tensors
    for name in tqdm(targets, desc=f"packing {form}", file=sys.stderr, mininterval=5):
        linear = model.get_submodule(name)
        if where is None:
            try:
                mask, quantized, equivalent = compress(linear.weight, form)
                packed, why = pack_target(equivalent.to(torch.bfloat16), mask, quantized)
                where = linear.weight.device
            except (RuntimeError, TypeError) as error:
                say(f"  packing on {linear.weight.device} failed ({type(error).__name__}: {str(error)[:200]}): packing on the CPU")
                where = torch.device("cpu")
        mask, quantized, equivalent = compress(linear.weight.to(where), form)
        stored = equivalent.to(torch.bfloat16)
        packed, why = pack_target(stored, mask, quantized)
        if packed is None:
            raise RuntimeError(f"{name}: {form} did not pack ({why})")
        nbytes += tensor_bytes({k: v for k, v in vars(packed).items() if isinstance(v, torch.Tensor)})
        modules[name] = from_packed(packed, linear.bias).to(linear.weight.device)
        equivalents[name] = stored.to(linear.weight.device)
    return modules, equivalents, nbytes


def swap(model, modules: dict) -> dict:
    """Put each module at its target's path; returns what was there."""
    before = {}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        before[name] = getattr(owner, child)
        setattr(owner, child, module)
    return before


@torch.no_grad()
def run_model(spec: str, args, env: dict, rows: list, save) -> None:
    """Dense and every form of one model, each record appended to `rows` and saved (save()) as it is made."""
    device = torch.device(args.device)
    started = time.perf_counter()
    name, _, layers = spec.partition(":")
    model = build(name, int(layers) if layers else None, device)
    targets = targets_of(model)
    dense_bytes = sum(model.get_submodule(t).weight.numel() * 2 for t in targets)
    layers = model.config.num_hidden_layers
    say(f"{name}: {layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters ({time.perf_counter() - started:.0f} s)")
    base = {**env, "model": name, "layers": layers, "new_tokens": args.new_tokens}
    for batch in args.batches:
        prompt = torch.randint(3, 32000, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch)).to(device)
        dense = decode(model, prompt, args.new_tokens, args.repeats, not args.eager)
        rows.append({**base, "form": "dense_bf16", "batch": batch, "target_bytes": dense_bytes, **without_tokens(dense)})
        save()
        say(f"  batch {batch} dense: {dense['tokens_per_s']} tok/s (graphs {dense['graphs']})")
    for form in args.forms:
        started = time.perf_counter()
        modules, equivalents, nbytes = pack_all(model, targets, form.partition("@")[0])
        say(f"  {form}: packed {len(modules)} targets, {nbytes / 1e9:.2f} GB ({time.perf_counter() - started:.0f} s)")
        originals = {t: model.get_submodule(t).weight.detach().clone() for t in targets}
        for batch in args.batches:
            prompt = torch.randint(3, 32000, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch)).to(device)
            for t in targets:
                model.get_submodule(t).weight.copy_(equivalents[t])
            equivalent = decode(model, prompt, args.new_tokens, 1, not args.eager)
            sequence = torch.cat([prompt, torch.tensor(equivalent["tokens"], device=device)], 1)
            reference_logits = teacher_forced(model, sequence)
            for t in targets:
                model.get_submodule(t).weight.copy_(originals[t])
            linears = swap(model, modules)
            dispatched = cuda_mma_extras.DISPATCH, cuda_mma_extras.DISPATCH_MAX_ROWS
            if form.endswith(("@fused", "@three")):
                cuda_mma_extras.DISPATCH = form.endswith("@fused")
                cuda_mma_extras.DISPATCH_MAX_ROWS = mma_extras_layout.MAX_OUTLIER_ROWS
            try:
                packed = decode(model, prompt, args.new_tokens, args.repeats, not args.eager)
                agreement = compare_logits(teacher_forced(model, sequence), reference_logits)
            finally:
                swap(model, linears)
                cuda_mma_extras.DISPATCH, cuda_mma_extras.DISPATCH_MAX_ROWS = dispatched
            del reference_logits
            dense_row = next(r for r in rows if r["model"] == name and r["form"] == "dense_bf16" and r["batch"] == batch)
            diffs = [first_difference(a, b) for a, b in zip(packed["tokens"], equivalent["tokens"])]
            differing = [d for d in diffs if d is not None]
            row = {**base, "form": form, "batch": batch, "target_bytes": nbytes, **without_tokens(packed),
                   "dense_equivalent_tokens_per_s": equivalent["tokens_per_s"],
                   "ratio_vs_dense": round(packed["tokens_per_s"] / dense_row["tokens_per_s"], 3),
                   "same_tokens": not differing, "sequences_differing": len(differing),
                   "first_difference": min(differing) if differing else None, **agreement}
            rows.append(row)
            save()
            say(f"  batch {batch} {form}: {packed['tokens_per_s']} tok/s, {row['ratio_vs_dense']}x dense, same tokens {row['same_tokens']}"
                f"{'' if not differing else f' ({len(differing)} of {batch} differ, first at {min(differing)})'}; teacher-forced {agreement}")
        del modules, equivalents, originals
        if device.type == "cuda":
            torch.cuda.empty_cache()


def without_tokens(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "tokens"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1b,7b", help="shapes, each optionally with its decoder layer count: 1b,7b:8 "
                        "(default: the shape's own, 16 / 32)")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same steps eagerly, a smoke test")
    parser.add_argument("--json", help="write the records (a JSON list) here")
    parser.add_argument("--plan-prefetch", type=int, default=None, help="the tensor-core plan's L2 prefetch (cuda_mma.PLAN_PREFETCH)")
    parser.add_argument("--transposed-walk", action="store_true",
                        help="SpQR / LUT outliers at 9-16 rows walked on a transposed copy of the activations (cuda_mma_extras.TRANSPOSED_WALK)")
    args = parser.parse_args(argv)
    cuda_mma_extras.TRANSPOSED_WALK = args.transposed_walk or cuda_mma_extras.TRANSPOSED_WALK
    if args.plan_prefetch is not None:
        from compress.kernels import cuda_mma

        cuda_mma.PLAN_PREFETCH = args.plan_prefetch
    args.forms = [f for f in args.forms.split(",") if f]
    args.batches = [int(b) for b in args.batches.split(",")]
    import transformers
    import triton

    env = {"gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(), "torch": torch.__version__,
           "triton": triton.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "command": " ".join(["python3", *sys.argv]), "plan_prefetch": args.plan_prefetch or 0,
           "transposed_walk": cuda_mma_extras.TRANSPOSED_WALK}
    print(json.dumps(env), flush=True)
    rows: list[dict] = []

    def save() -> None:  # after every record: a run cut off by a time limit keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))

    for name in args.models.split(","):
        run_model(name, args, env, rows, save)
    print(f"{'model':5} {'form':15} {'batch':>5} {'tok/s':>9} {'x dense':>8} {'graphs':>6}  same tokens")
    for r in rows:
        print(f"{r['model']:5} {r['form']:15} {r['batch']:>5} {r['tokens_per_s']:>9} {r.get('ratio_vs_dense', 1.0):>8} {str(r['graphs']):>6}  "
              f"{r.get('same_tokens', '')} {r.get('first_difference') or ''}")


if __name__ == "__main__":
    main()
