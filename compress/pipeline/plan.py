"""`compress plan`: every stage resolved against the model without loading its weights or calibrating.

The model is built on the meta device from its config (shapes, no memory), so a 70B plan takes
seconds. The plan lists each target a stage will compress (name, shape, method, key parameters,
fused expert or not), what is deliberately left out and why, and a rough estimate of each stage's
peak memory and time. Every input error `compress run` would hit (a pattern that matches nothing, a
stage with no targets, a shape a method cannot handle, missing or too short texts, a checkpoint file
that is truncated or does not fit the config, more memory than the machine has: checks.py) is raised
here, and `compress run` calls this before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from compress.calibration.shelf import TensorShelf
from compress.errors import CompressError
from compress.model.checkpoint import CheckpointFiles, keys_match
from compress.model.load import _detect_kind, checkpoint_dtype, compute_dtype_for, materialize_source, pick_device
from compress.model.targets import discover
from compress.pipeline.calibrate import needs_calibration
from compress.pipeline.checks import check_checkpoint, check_memory, check_texts
from compress.pipeline.checks import human_size as _size
from compress.pipeline.stages import plan_stages
from compress.recipe import Recipe

# Rough sustained rates for the estimate (dense fp32 matmul on a 2-core CPU; bf16 on one H100).
FLOPS_PER_SECOND = {"cpu": 5e10, "cuda": 2e14}


@dataclass
class StagePlan:
    index: int
    method: str
    params: dict[str, Any]
    refines: int | None = None  # the pruning stage whose mask this one refines (DSnoT)
    targets: list[dict[str, Any]] = field(default_factory=list)
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0
    activation_bytes: int = 0  # the part of the peaks that scales with calibration.nsamples (0: the host peak does not)
    seconds_estimate: float = 0.0


@dataclass
class Plan:
    source: str  # as the user named it
    model_path: str  # the local folder it resolved to
    kind: str
    architecture: str
    params: int
    storage_dtype: str
    compute_dtype: str
    device: str
    blocks: int
    targets: int
    stages: list[StagePlan]
    left_out: dict[str, str]
    streams: bool = False  # stages read the checkpoint one block at a time
    warnings: list[str] = field(default_factory=list)  # what will not work as asked (an export), said before the work

    def model_info(self) -> dict[str, Any]:
        """The report's `model` section."""
        return {"source": self.source, "kind": self.kind, "architecture": self.architecture, "params": self.params,
                "storage_dtype": self.storage_dtype, "compute_dtype": self.compute_dtype, "device": self.device}

    def describe(self) -> dict[str, Any]:
        return {**self.model_info(), "streams": self.streams, "left_out": self.left_out, "warnings": self.warnings,
                "stages": [vars(stage) for stage in self.stages]}


def _skeleton(path: str, kind: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    loader = AutoModelForCausalLM if kind == "causal" else AutoModel
    with torch.device("meta"):
        return loader.from_config(config)


def build_plan(recipe: Recipe) -> Plan:
    """Resolve every stage of the recipe against the model's skeleton; raise CompressError on any
    input error."""
    from transformers import AutoTokenizer

    path, source = materialize_source(recipe.model)
    try:
        kind = _detect_kind(str(path)) if recipe.model.kind == "auto" else recipe.model.kind
        model = _skeleton(str(path), kind)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressError(f"could not load model {source!r}: {first_line}") from None
    check_checkpoint(path, model)
    layout = discover(model)
    planned = plan_stages(recipe, layout)
    norms = [name for name, module in model.named_modules() if "norm" in type(module).__name__.lower()]
    left_out = dict(layout.left_out)
    if norms:
        left_out[f"{len(norms)} normalisation layers ({norms[0]}, ...)"] = "scale vectors, not weight matrices: kept as they are"
    check_texts(recipe, model.config, tokenizer, needs_calibration(recipe) or any(stage.method.trains for stage in planned))

    device = pick_device(recipe.model.device)
    storage_dtype = checkpoint_dtype(path)
    compute_dtype = compute_dtype_for(recipe.model, storage_dtype, device)
    compute_bytes = torch.finfo(compute_dtype).bits // 8
    params = sum(p.numel() for p in model.parameters())
    hidden = int(getattr(model.config, "hidden_size", 0) or layout.targets[0].in_features)
    tokens = recipe.calibration.nsamples * recipe.calibration.seqlen
    block_params = [sum(p.numel() for p in block.parameters()) for block in layout.blocks]
    streams = _streams(path, model)
    storage_bytes = torch.finfo(storage_dtype).bits // 8
    # a streamed stage holds what lies outside the blocks and one block (plus its stored copy while
    # it is read); a checkpoint that cannot stream is held whole
    resident = ((params - sum(block_params)) * compute_bytes + max(block_params) * (compute_bytes + storage_bytes)
                if streams else params * compute_bytes)
    stages = []
    for index, (stage, spec) in enumerate(zip(planned, recipe.stages)):
        names = set(stage.method.statistics) | ({"hessian"} if recipe.evaluate.layer_error else set())
        data = bool(names)
        plan = StagePlan(index, stage.method.name, _key_params(spec.params.model_dump(mode="json")), stage.refines)
        plan.targets = [
            {"name": t.name, "shape": list(t.weight.shape), "fused_expert": t.is_expert, "block": t.block}
            for t in stage.targets
        ]
        if stage.method.trains:
            _plan_training(plan, spec.params, params, model.config, device)
            stages.append(plan)
            continue
        by_block = layout.by_block(stage.targets)
        activations = tokens * hidden * compute_bytes if data else 0
        statistics = max((_statistics_bytes(targets, names) for targets in by_block), default=0)
        refine = max((sum(t.numel for t in targets) * 4 for targets in by_block), default=0) if stage.method.refines_mask else 0
        largest_block = max(block_params) * compute_bytes
        masks = sum(t.numel for t in layout.targets) // 8  # every target's mask, 1 bit a weight
        # the Fisher pass holds the whole model; its fp32 sums stay where they are summed (the device)
        # and go to disk a bounded part at a time (compress/streaming.TensorShelf)
        fisher_sums = sum(t.numel for t in stage.targets) * 4 if "fisher" in names else 0
        on_gpu = device.type == "cuda"
        fisher_host = params * compute_bytes + (TensorShelf.CHUNK_BYTES if on_gpu else fisher_sums) if fisher_sums else 0
        fisher_device = params * compute_bytes + fisher_sums + activations if fisher_sums and on_gpu else 0
        host = resident + activations + statistics + refine + masks
        plan.peak_host_bytes = max(host, fisher_host)
        plan.peak_device_bytes = max(largest_block + activations + statistics + refine, fisher_device) if on_gpu else 0
        plan.activation_bytes = activations if host >= fisher_host else 0
        flops = sum(stage.method.flops(t, tokens) + (2.0 * tokens * t.in_features**2 if "hessian" in names else 0.0)
                    for t in stage.targets)
        flops += sum(2 * n * tokens * 2 for n, targets in zip(block_params, by_block) if targets) if data else 0
        plan.seconds_estimate = flops / FLOPS_PER_SECOND[device.type]
        stages.append(plan)
    check_memory(recipe, stages, device, compute_dtype)

    def name(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    return Plan(source, str(path), kind, type(model).__name__, params, name(storage_dtype), name(compute_dtype), str(device),
                len(layout.blocks), len(layout.targets), stages, left_out, streams, _export_warnings(recipe, layout))


def _plan_training(plan: StagePlan, train: Any, params: int, config: Any, device: torch.device) -> None:
    """A training stage holds the whole model (16 bytes a parameter: fp32 with its gradients and two
    optimizer moments; less for a frozen base that only adapters train on), the teacher in the compute
    dtype, and one micro-batch's activations."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and train.seqlen > context:
        raise CompressError(f"stages.{plan.index}.seqlen={train.seqlen} is longer than the model's context ({context} positions)")
    on_gpu = device.type == "cuda"
    tokens = train.batch_size * train.seqlen
    hidden, layers = int(getattr(config, "hidden_size", 0) or 0), int(getattr(config, "num_hidden_layers", 0) or 0)
    activations = tokens * (hidden * layers * 40 + int(getattr(config, "vocab_size", 0) or 0) * 12)  # rough: blocks' saved tensors, logits
    peak = int(params * train.resident_bytes_per_param) + (params * (2 if on_gpu else 4) if train.uses_teacher else 0) + activations
    plan.peak_host_bytes = params * 8 if on_gpu else peak
    plan.peak_device_bytes = peak if on_gpu else 0
    plan.seconds_estimate = 8.0 * params * tokens * train.steps * train.grad_accum / FLOPS_PER_SECOND[device.type]


def _export_warnings(recipe: Recipe, layout) -> list[str]:
    """Exports that will not work for this model. ONNX traces fused MoE experts through transformers'
    `batched_mm` implementation (compress/pipeline/onnx.py); an experts module without it loops over
    the experts a batch hits, which no exporter handles."""
    if not recipe.output.onnx:
        return []
    loops = sorted({type(t.module).__name__ for t in layout.targets if t.is_expert and not hasattr(t.module, "is_concatenated")})
    if loops:
        return [f"ONNX export will fail: {loops[0]} has no traceable experts implementation; the checkpoint and packed "
                f"weights are written either way (output.onnx: false skips ONNX)"]
    return []


def _streams(path, model: torch.nn.Module) -> bool:
    """Whether stages can read this checkpoint one block at a time (compress/calibration/streaming.py)."""
    try:
        return keys_match(model, CheckpointFiles(path))
    except (OSError, ValueError, KeyError):
        return False


def _key_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "targets"}


def _statistics_bytes(targets: list, names: set[str]) -> int:
    total = 0
    for target in targets:
        if "hessian" in names:
            total += 2 * target.in_features**2 * 4  # X^T X and the method's inverse factor
        total += sum(target.in_features * 8 for name in names if name != "hessian")
    return total


def format_plan(plan: Plan) -> str:
    lines = [f"warning: {warning}" for warning in plan.warnings]
    lines += [f"model {plan.source}: {plan.architecture} ({plan.kind}), {plan.params:,} parameters, on {plan.device}; "
             + ("stages stream it one block at a time" if plan.streams
                else "its files are not in the model's own layout: the first stage loads it whole")]
    for stage in plan.stages:
        params = ", ".join(f"{k}={v}" for k, v in stage.params.items())
        experts = sum(t["fused_expert"] for t in stage.targets)
        lines.append("")
        lines.append(f"stage {stage.index} ({stage.method}: {params})")
        lines.append(f"  {len(stage.targets)} targets{f' ({experts} fused experts)' if experts else ''}; "
                     f"peak host memory ~{_size(stage.peak_host_bytes)}"
                     + (f", GPU ~{_size(stage.peak_device_bytes)}" if stage.peak_device_bytes else "")
                     + f"; time ~{stage.seconds_estimate:.0f} s (rough)")
        width = max(len(t["name"]) for t in stage.targets)
        for target in stage.targets:
            shape = "x".join(map(str, target["shape"]))
            lines.append(f"  {target['name']:<{width}}  {shape:>11}{'  fused expert' if target['fused_expert'] else ''}")
    lines.append("")
    lines.append("left out (never compressed):")
    for name, why in plan.left_out.items():
        lines.append(f"  {name}: {why}")
    return "\n".join(lines)
