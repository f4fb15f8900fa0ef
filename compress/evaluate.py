"""Evaluation: perplexity as in the papers, fidelity to the dense model, and measured size.

Perplexity: the eval text is tokenized whole (no special tokens) and cut into non-overlapping windows
of `seqlen` tokens (the tail shorter than a window is dropped); each window is scored on its own and
ppl = exp(mean over windows of the mean next-token NLL), as the Wanda/SparseGPT references do for
WikiText2. Encoders: cosine similarity of mean-pooled last hidden states to the dense model's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.targets import Target


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> float:
    """exp of the mean next-token NLL over non-overlapping windows ([n, seqlen] token ids)."""
    home = next(model.parameters()).device
    model.to(device)
    total_nll, count = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)
            total_nll += nll.mean(dim=1).sum().item()
            count += batch.shape[0]
    finally:
        model.to(home)
    return math.exp(total_nll / count)


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> torch.Tensor:
    """Mean of the last hidden states over each window's tokens ([n, hidden], fp32, on CPU)."""
    home = next(model.parameters()).device
    model.to(device)
    out = []
    try:
        for batch in tqdm(windows.split(batch_size), desc="embeddings", unit="batch", leave=False):
            batch = batch.to(device)
            hidden = model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state
            out.append(hidden.float().mean(dim=1).cpu())
    finally:
        model.to(home)
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(reference, embeddings, dim=-1).mean().item()


def target_sparsity(targets: list[Target]) -> tuple[dict[str, float], float]:
    """Fraction of exact zeros per target and over all targets (weighted by size)."""
    per_target = {}
    zeros = total = 0
    for target in targets:
        count = int((target.weight == 0).sum())
        per_target[target.name] = count / target.numel
        zeros += count
        total += target.numel
    return per_target, zeros / total if total else 0.0


def stored_bits_per_param(target_numels: list[int], storage_bits: int, packed_bytes: int = 0, packed_params: int = 0) -> float:
    """Bits stored per target weight. A dense HF checkpoint stores every weight, zero or not, at its
    dtype's width; quantized targets count the bytes of the packed file (all its metadata included),
    `packed_bytes` for `packed_params` of the targets' weights."""
    total = sum(target_numels)
    if not total:
        return 0.0
    dense_bits = storage_bits * (total - packed_params)
    return (dense_bits + 8 * packed_bytes) / total


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
