"""The evaluate step: quality of the compressed model (perplexity and fidelity to the dense model for
a causal LM, embedding cosine for an encoder) on non-overlapping windows of the evaluation text, and
(stored apart, once per model) of the dense one; sparsity per target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress import __version__
from compress.calibration.data import embedded_text, read_text_file, tokenize
from compress.errors import CompressError
from compress.model.targets import discover
from compress.pipeline.checkpoints import compute_settings, open_checkpoint
from compress.pipeline.metrics import TopTokens, causal_scores, embedding_cosine, eval_windows, mean_pooled_embeddings, target_sparsity
from compress.pipeline.store import StepResult, StepStore, digest, file_digests
from compress.recipe import Recipe

EMBEDDINGS_FILE = "embeddings.safetensors"
TOP_TOKENS_FILE = "top_tokens.safetensors"  # the dense model's top-k next tokens: the KL's reference


def eval_tokens(recipe: Recipe, tokenizer: object) -> tuple[torch.Tensor, str]:
    """The evaluation windows of the recipe's text (or the embedded one) and how to name that text."""
    path = recipe.evaluate.text or str(embedded_text("eval.txt"))
    ids = tokenize(tokenizer, read_text_file(path, "evaluation"))
    windows = eval_windows(ids, recipe.evaluate.seqlen, recipe.evaluate.max_windows)
    if windows.shape[0] == 0:
        raise CompressError(f"evaluation text {path} has {ids.numel()} tokens, fewer than evaluate.seqlen={recipe.evaluate.seqlen}")
    return windows, path if recipe.evaluate.text else "<embedded eval.txt>"


# What an evaluate step measures; changed when a measure's definition changes, so a stored step
# measured the old way is not reused (2: sparsity counts pruned weights, from the masks).
MEASURES = 2


def evaluate_step(store: StepStore, recipe: Recipe, load: StepResult, final: StepResult) -> StepResult:
    """Quality of the compressed model (and, stored apart, of the dense one), sparsity per target."""
    spec = recipe.evaluate
    text_key = file_digests([spec.text])[0] if spec.text else "embedded"
    settings = compute_settings(recipe.model)
    causal = load.info["kind"] == "causal"
    dense = None
    if spec.dense or not causal:  # an encoder's fidelity needs the dense embeddings
        dense_key = digest("dense", __version__, spec.model_dump(mode="json"), text_key, load.key, settings)
        dense = store.run("dense", dense_key, lambda folder: _measure(recipe, load, folder, None, keep_top=spec.kl_top_k))
    key = digest("evaluate", __version__, MEASURES, spec.model_dump(mode="json"), text_key, final.key, dense.key if dense else None, settings)
    result = store.run("evaluate", key, lambda folder: _measure(recipe, final, folder, dense))
    result.info["dense"] = dense.info if dense is not None else None  # not stored: the key already covers it
    return result


def _measure(recipe: Recipe, checkpoint: StepResult, folder: Path, dense: StepResult | None, keep_top: int = 0) -> dict[str, Any]:
    """Quality of `checkpoint` (against the `dense` step's outputs, if given); `keep_top` > 0: keep
    this model's top next tokens, for later KLs against it (the dense pass)."""
    loaded, state = open_checkpoint(checkpoint, recipe.model)
    windows, source = eval_tokens(recipe, loaded.tokenizer)
    info: dict[str, Any] = {
        "evaluation": {
            "text": source,
            "seqlen": recipe.evaluate.seqlen,
            "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()),
            "windowing": "non-overlapping",
            "metric": "perplexity" if loaded.kind == "causal" else "embedding_cosine (mean-pooled, vs dense)",
        }
    }
    if loaded.kind == "causal":
        reference = None
        if dense is not None and (dense.path / TOP_TOKENS_FILE).exists():
            saved = load_file(str(dense.path / TOP_TOKENS_FILE))
            reference = TopTokens(saved["ids"], saved["logprobs"])
        scores = causal_scores(loaded.model, windows, loaded.device, recipe.evaluate.batch_size, reference, keep_top)
        info["perplexity"] = scores.perplexity
        if scores.top_tokens is not None:
            save_file({"ids": scores.top_tokens.ids, "logprobs": scores.top_tokens.logprobs}, str(folder / TOP_TOKENS_FILE))
        if reference is not None:
            info["kl_to_dense"] = scores.kl_to_reference
            info["top1_agreement"] = scores.top1_agreement
            info["evaluation"]["kl_to_dense"] = (f"mean per-token KL(dense || compressed), nats, over the dense model's top "
                                                 f"{reference.ids.shape[-1]} next tokens + the rest as one bin (a lower bound)")
    else:
        embeddings = mean_pooled_embeddings(loaded.model, windows, loaded.device, recipe.evaluate.batch_size)
        save_file({"embeddings": embeddings.contiguous()}, str(folder / EMBEDDINGS_FILE))
        reference = embeddings if dense is None else load_file(str(dense.path / EMBEDDINGS_FILE))["embeddings"]
        info["embedding_cosine"] = embedding_cosine(reference, embeddings)
    layout = discover(loaded.model)
    compressed = [t for t in layout.targets if t.name in state.targets]
    per_target, overall = target_sparsity(compressed, {t.name: state.mask(t.name) for t in compressed})
    info.update(
        sparsity=overall,
        params=sum(p.numel() for p in loaded.model.parameters()),
        target_params=sum(t.numel for t in compressed),
        storage_bits=torch.finfo(loaded.storage_dtype).bits,
        targets={
            t.name: {"shape": list(t.weight.shape), "sparsity": per_target[t.name], "fused_expert": t.is_expert}
            for t in compressed
        },
    )
    return info
