"""Fidelity metrics: the binned KL against the full one, and a model scored against itself."""

import torch
from test_pipeline import dense_tokenizer

from compress.calibration.data import embedded_text, read_text_file, tokenize
from compress.model.load import embedded_model_path
from compress.pipeline.metrics import _binned_kl, causal_scores, eval_windows


def _full_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def test_binned_kl_is_the_full_kl_with_every_token_and_a_lower_bound_with_fewer():
    generator = torch.Generator().manual_seed(0)
    p_logits = 3 * torch.randn(64, 50, generator=generator)
    q_logits = p_logits + torch.randn(64, 50, generator=generator)
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    full = _full_kl(p_logits, q_logits)
    top = p.topk(50, dim=-1)
    assert torch.allclose(_binned_kl(top.values, q.gather(-1, top.indices)), full, rtol=1e-5, atol=1e-7)
    for k in (1, 5, 20):
        top = p.topk(k, dim=-1)
        binned = _binned_kl(top.values, q.gather(-1, top.indices))
        assert (binned >= -1e-7).all() and (binned <= full + 1e-6).all()
        assert binned.mean() < full.mean()  # the tail's inner differences are lost, not invented
    assert torch.allclose(_binned_kl(top.values, top.values), torch.zeros(64, dtype=torch.float64), atol=1e-12)


def test_a_model_against_its_own_top_tokens_has_no_kl_and_full_agreement():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32).eval()
    ids = tokenize(dense_tokenizer(), read_text_file(embedded_text("eval.txt"), "eval"))
    windows = eval_windows(ids, 64, max_windows=6)
    dense = causal_scores(model, windows, torch.device("cpu"), batch_size=4, keep_top=8)
    assert dense.top_tokens.ids.shape == (6, 63, 8) and dense.top_tokens.ids.dtype == torch.int32
    again = causal_scores(model, windows, torch.device("cpu"), batch_size=4, reference=dense.top_tokens)
    assert again.perplexity == dense.perplexity
    assert abs(again.kl_to_reference) < 1e-9 and again.top1_agreement == 1.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    changed = causal_scores(model, windows, torch.device("cpu"), batch_size=4, reference=dense.top_tokens)
    assert changed.kl_to_reference > 1e-4 and changed.top1_agreement < 1.0
