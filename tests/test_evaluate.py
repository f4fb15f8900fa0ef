"""Fidelity metrics: the binned KL against the full one, a model scored against itself, and the
perplexity windows and formula against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fast_recipe
from test_pipeline import dense_tokenizer

import compress
from compress.calibration.data import embedded_text, read_text_file, tokenize
from compress.model.load import embedded_model_path
from compress.pipeline.evaluate import eval_tokens, evaluate_step
from compress.pipeline.load import load_step
from compress.pipeline.metrics import _binned_kl, causal_scores, eval_windows, perplexity
from compress.pipeline.store import StepStore
from compress.recipe import validate_recipe


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


def test_eval_windows_are_consecutive_disjoint_slices_of_the_text():
    """Window k is ids[k * seqlen:(k + 1) * seqlen]: no token is scored twice, none is skipped before
    the tail, and the order is the text's (so a stride below seqlen cannot pass)."""
    ids = torch.arange(1000) * 7 + 3  # every token distinct: any overlap or gap shows
    for seqlen, cap in ((128, None), (100, 4), (7, None), (333, 10)):
        windows = eval_windows(ids, seqlen, cap)
        count = min(ids.numel() // seqlen, cap if cap is not None else ids.numel())
        assert windows.shape == (count, seqlen)
        for k in range(count):
            assert torch.equal(windows[k], ids[k * seqlen : (k + 1) * seqlen]), f"window {k} (seqlen {seqlen})"
        assert torch.equal(windows.reshape(-1), ids[: count * seqlen])  # disjoint, in order, nothing skipped


def test_evaluate_step_perplexity_is_exp_of_the_mean_token_nll_computed_by_hand(tmp_path):
    """The evaluate step's windows and perplexity against a plain loop: windows cut by hand from the
    tokenized eval text, each scored with cross_entropy on the embedded model, ppl = exp(mean NLL)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seqlen, max_windows = 128, 12
    recipe = validate_recipe(fast_recipe({"method": "magnitude", "sparsity": 0.5},
                                         evaluate={"seqlen": seqlen, "max_windows": max_windows, "dense": False}))
    load = load_step(recipe)
    measured = evaluate_step(StepStore(tmp_path / "steps"), recipe, load, load).info  # the dense checkpoint, scored

    model = AutoModelForCausalLM.from_pretrained(compress.embedded_model(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(compress.embedded_model())
    text = read_text_file(embedded_text("eval.txt"), "eval")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    count = min(ids.numel() // seqlen, max_windows)
    nlls = []
    with torch.no_grad():
        for k in range(count):
            window = ids[k * seqlen : (k + 1) * seqlen]
            logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
            nlls.append(F.cross_entropy(logits, window[1:], reduction="none"))
    expected = math.exp(torch.cat(nlls).mean().item())

    assert measured["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert measured["evaluation"]["windows"] == count and measured["evaluation"]["tokens"] == count * seqlen
    windows, _ = eval_tokens(recipe, tokenizer)  # what the evaluate step scores
    assert windows.shape == (count, seqlen)
    for k in range(count):
        assert torch.equal(windows[k], ids[k * seqlen : (k + 1) * seqlen]), f"window {k} is not the text's k-th slice"
    assert perplexity(model, windows, torch.device("cpu"), batch_size=5) == pytest.approx(expected, rel=1e-5)
