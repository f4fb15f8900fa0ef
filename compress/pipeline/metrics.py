"""Evaluation: perplexity as in the papers, fidelity to the dense model, and measured size.

Perplexity: the eval text is tokenized whole (no special tokens) and cut into non-overlapping windows
of `seqlen` tokens (the tail shorter than a window is dropped); each window is scored on its own and
ppl = exp(mean over windows of the mean next-token NLL), as the Wanda/SparseGPT references do for
WikiText2. Encoders: cosine similarity of mean-pooled last hidden states to the dense model's.

Fidelity of a causal LM to the dense one, on the same windows: the mean per-token KL(dense || compressed)
and how often the two agree on the most likely next token. Perplexity is a noisy judge of small
changes (rounding errors that happen to lower the loss count as gains); the KL is not. The dense pass
keeps only its top-k next-token log-probabilities (k = 64: ~60 MB for 115k tokens), so the KL is taken
over those k tokens plus the rest of the vocabulary as one bin: a lower bound of the full KL (merging
outcomes never raises it), exact when k is the vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.model.targets import Target
from compress.progress import bar


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)


@dataclass
class TopTokens:
    """A model's k most likely next tokens at every position of every window: ids [n, seqlen - 1, k]
    int32 and their log-probabilities (float32, descending)."""

    ids: torch.Tensor
    logprobs: torch.Tensor


@dataclass
class CausalScores:
    perplexity: float
    kl_to_reference: float | None = None  # mean nats per token, over the reference's top-k + the rest
    top1_agreement: float | None = None  # share of positions where both models' most likely token is the same
    top_tokens: TopTokens | None = None  # this model's, when asked for


@torch.no_grad()
def causal_scores(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 8,
    reference: TopTokens | None = None,
    keep_top: int = 0,
) -> CausalScores:
    """Perplexity over non-overlapping windows ([n, seqlen] token ids); with `reference` (another
    model's top tokens on the same windows) the KL from it and the top-1 agreement; with `keep_top`
    > 0 this model's own top tokens, to be a reference later."""
    if reference is not None and reference.ids.shape[:2] != (windows.shape[0], windows.shape[1] - 1):
        raise ValueError(f"the reference was scored on {tuple(reference.ids.shape[:2])} positions, these windows have "
                         f"{(windows.shape[0], windows.shape[1] - 1)}: score both on the same text and seqlen")
    home = next(model.parameters()).device
    model.to(device)
    total_nll = total_kl = 0.0
    agree = count = 0
    kept_ids, kept_logprobs = [], []
    try:
        for index, batch in enumerate(bar(iterable=windows.split(batch_size), desc="perplexity", unit="batch")):
            batch = batch.to(device)
            logprobs = model(input_ids=batch, use_cache=False).logits[:, :-1].float().log_softmax(dim=-1)
            total_nll += window_nll(logprobs, batch).sum().item()
            count += batch.shape[0]
            if reference is not None:
                rows = slice(index * batch_size, index * batch_size + batch.shape[0])
                ids = reference.ids[rows].to(device, torch.int64)
                kl = _binned_kl(reference.logprobs[rows].to(device), logprobs.gather(-1, ids))
                total_kl += kl.sum().item()
                agree += int((logprobs.argmax(dim=-1) == ids[..., 0]).sum())
            if keep_top:
                top = logprobs.topk(min(keep_top, logprobs.shape[-1]), dim=-1)
                kept_ids.append(top.indices.to(torch.int32).cpu())
                kept_logprobs.append(top.values.cpu())
    finally:
        model.to(home)
    positions = windows.shape[0] * (windows.shape[1] - 1)
    return CausalScores(
        perplexity=math.exp(total_nll / count),
        kl_to_reference=total_kl / positions if reference is not None else None,
        top1_agreement=agree / positions if reference is not None else None,
        top_tokens=TopTokens(torch.cat(kept_ids), torch.cat(kept_logprobs)) if keep_top else None,
    )


def _binned_kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position, both distributions cut into the reference's top-k tokens and one bin
    for the rest: `reference`, `other` [..., k] log-probabilities of the same tokens."""
    # a rest below the inputs' rounding (k values each off by ~eps) is no mass at all, not a bin
    # whose log ratio of two rounding errors would dominate the sum
    noise = reference.shape[-1] * torch.finfo(reference.dtype).eps
    reference, other = reference.double(), other.double()
    kl = (reference.exp() * (reference - other)).sum(-1)
    # the rest's mass, 1 - sum(p), from the logsumexp so that a top-k holding ~all the mass stays exact
    rest_p = -torch.expm1(reference.logsumexp(-1))
    rest_q = (-torch.expm1(other.logsumexp(-1))).clamp_min(noise)
    tail = torch.where(rest_p > noise, rest_p * (rest_p.clamp_min(noise).log() - rest_q.log()), 0.0)
    return kl + tail


def window_nll(logprobs: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Each window's mean next-token NLL, from the log-probabilities [n, seqlen - 1, vocab] of its positions."""
    return -logprobs.gather(-1, windows[:, 1:, None]).squeeze(-1).mean(dim=1)


def perplexity_of_logits(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """causal_scores' perplexity from logits already computed for `windows` ([n, seqlen] token ids)."""
    return math.exp(window_nll(logits[:, :-1].float().log_softmax(dim=-1), windows.to(logits.device)).mean().item())


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> float:
    """exp of the mean next-token NLL over non-overlapping windows ([n, seqlen] token ids)."""
    return causal_scores(model, windows, device, batch_size).perplexity


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> torch.Tensor:
    """Mean of the last hidden states over each window's tokens ([n, hidden], fp32, on CPU)."""
    home = next(model.parameters()).device
    model.to(device)
    out = []
    try:
        for batch in bar(iterable=windows.split(batch_size), desc="embeddings", unit="batch"):
            batch = batch.to(device)
            hidden = model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state
            out.append(hidden.float().mean(dim=1).cpu())
    finally:
        model.to(home)
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(reference, embeddings, dim=-1).mean().item()


def target_sparsity(targets: list[Target], masks: dict[str, torch.Tensor | None]) -> tuple[dict[str, float], float]:
    """Fraction of pruned weights per target (from its mask: a quantized weight that rounds to zero is
    not pruned) and over all targets (weighted by size)."""
    per_target = {}
    pruned = total = 0
    for target in targets:
        mask = masks.get(target.name)
        count = 0 if mask is None else int((~mask).sum())
        per_target[target.name] = count / target.numel
        pruned += count
        total += target.numel
    return per_target, pruned / total if total else 0.0


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
