"""The verify step: the packed export, loaded back through `compress.load` (kernel-backed modules,
no dense weight of a packed target), run on the first evaluation windows and compared with the model
the evaluate step measured. Run on the output before it is published: an export that does not compute
what was evaluated never appears, and the error names the layers that differ."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from compress.deploy.load import load_packed
from compress.deploy.packed_model import fused_parts
from compress.errors import CompressError
from compress.kernels.experts import PackedExperts
from compress.kernels.modules import PackedLinear
from compress.model.targets import is_fused_experts
from compress.pipeline.checkpoints import open_checkpoint
from compress.pipeline.evaluate import eval_tokens
from compress.pipeline.metrics import perplexity_of_logits
from compress.pipeline.store import StepResult
from compress.recipe import Recipe

log = logging.getLogger("compress")

VERIFY_WINDOWS = 4  # windows of the evaluation text: enough to exercise every layer, cheap next to evaluate
# Allowed |logit difference| as a share of the largest |logit|. The evaluated model holds weights rounded
# to the checkpoint's dtype, the kernels dequantize them exactly and sum in another order: a few units in
# the last place of that dtype, grown through the layers. Computing in a 16-bit dtype (CUDA's default)
# rounds every activation as well, and the two models' roundings drift apart layer by layer: 8 units
# there (a 16-layer random-weight 1B LLaMA in bf16 differed by 2.2 units). A corrupted layer moves
# logits by far more.
ULPS = 2
ULPS_16BIT_COMPUTE = 8
# In a model with routed experts a difference that small can flip a token's top-k experts, and that
# token's logits then move by far more: the max alone would fail a sound export. There the check is per
# token position: at most this share beyond the tolerance, and the two perplexities this close. A
# corrupted layer moves every position.
ROUTED_SHARE = 0.01
ROUTED_PERPLEXITY = 0.005


def tolerance(storage_dtype: torch.dtype, scale: float, compute_dtype: torch.dtype = torch.float32) -> float:
    if torch.finfo(compute_dtype).bits <= 16:
        return ULPS_16BIT_COMPUTE * torch.finfo(compute_dtype).eps * max(scale, 1.0)
    return ULPS * torch.finfo(storage_dtype).eps * max(scale, 1.0)


def _outputs(model: torch.nn.Module, windows: torch.Tensor, causal: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=windows, use_cache=False) if causal else model(input_ids=windows)
    return (out.logits if causal else out.last_hidden_state).float()


def verify_export(packed_dir: Path, recipe: Recipe, final: StepResult, causal: bool) -> dict[str, Any]:
    """{"verify_ok", "verify_max_abs_diff", "verify_tolerance", "verify_perplexity", ...}; CompressError
    naming the layers when the packed model does not compute what was evaluated."""
    evaluated, _ = open_checkpoint(final, recipe.model)
    windows = eval_tokens(recipe, evaluated.tokenizer)[0][:VERIFY_WINDOWS]
    expected = _outputs(evaluated.model.cpu(), windows, causal)
    compute_dtype, storage_dtype = evaluated.compute_dtype, evaluated.storage_dtype
    del evaluated  # one model in memory at a time: the evaluated one is read again only to name the broken layers
    packed = load_packed(packed_dir, dtype=compute_dtype, kind="causal" if causal else "encoder")
    kernels = sum(isinstance(m, PackedLinear) for m in packed.modules())
    got = _outputs(packed, windows, causal)
    difference = float((got - expected).abs().max())
    allowed = tolerance(storage_dtype, float(expected.abs().max()), compute_dtype)
    result: dict[str, Any] = {"verify_ok": difference <= allowed, "verify_max_abs_diff": difference, "verify_tolerance": allowed,
                              "verify_windows": int(windows.shape[0]), "verify_packed_modules": kernels}
    if causal:
        result["verify_perplexity"] = perplexity_of_logits(got, windows)
        result["verify_evaluated_perplexity"] = perplexity_of_logits(expected, windows)
    if any(isinstance(m, PackedExperts) for m in packed.modules()) or any(is_fused_experts(m) for m in packed.modules()):
        share = float(((got - expected).abs().amax(-1) > allowed).float().mean())
        close = not causal or abs(result["verify_perplexity"] / result["verify_evaluated_perplexity"] - 1) <= ROUTED_PERPLEXITY
        result.update(verify_routed_share_over=share, verify_ok=share <= ROUTED_SHARE and close)
    if not result["verify_ok"]:
        layers = differing_layers(packed, open_checkpoint(final, recipe.model)[0].model, storage_dtype, compute_dtype)
        raise CompressError(
            f"verify: the packed export computes logits up to {difference:.4g} away from the evaluated model (tolerance {allowed:.3g}"
            f"{_routed_note(result)}); "
            f"layers that differ: {', '.join(layers[:8]) or 'none alone (the difference builds up across layers)'}"
            f"{' ...' if len(layers) > 8 else ''}. The export was not published; set output.verify: false to publish it anyway")
    return result


def differing_layers(packed: torch.nn.Module, evaluated: torch.nn.Module, storage_dtype: torch.dtype,
                     compute_dtype: torch.dtype = torch.float32, rows: int = 4) -> list[str]:
    """Packed modules whose output on random inputs differs from the evaluated Linear's beyond the
    tolerance (each layer alone, so the names point at the broken ones)."""
    found = []
    generator = torch.Generator().manual_seed(0)
    for name, module in packed.named_modules():
        if not isinstance(module, PackedLinear):
            continue
        weight, bias = _evaluated_weight(evaluated, name)
        x = torch.randn(rows, module.in_features, generator=generator)
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, weight.float(), None if bias is None else bias.float())
            got = module(x).float()
        if float((got - expected).abs().max()) > tolerance(storage_dtype, float(expected.abs().max()), compute_dtype):
            found.append(name)
    return found


def _evaluated_weight(evaluated: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The evaluated model's weight and bias of a packed module: a Linear's, or expert e's slice of a
    fused-experts parameter for `<experts>.<e>.<param>`."""
    head, expert, param = fused_parts(name)
    if expert is not None:
        return getattr(evaluated.get_submodule(head), param)[expert], None
    linear = evaluated.get_submodule(name)
    return linear.weight, linear.bias


def _routed_note(result: dict[str, Any]) -> str:
    if "verify_routed_share_over" not in result:
        return ""
    return (f"; with routed experts: {result['verify_routed_share_over']:.2%} of token positions beyond it, at most {ROUTED_SHARE:.0%} "
            f"allowed, perplexity {result.get('verify_perplexity', 0):.4g} against {result.get('verify_evaluated_perplexity', 0):.4g}")
