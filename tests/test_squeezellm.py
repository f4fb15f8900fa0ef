"""SqueezeLLM's core: weighted k-means against an exact reference, lossless where the table holds every
value, dense-and-sparse outliers counted as asked, a packed form that rebuilds what was computed, and
the Fisher diagonal against plain per-sequence backward passes."""

import itertools

import pytest
import torch

from compress.calibration.fisher import fisher_diagonal
from compress.formats.packed_file import read_packed, write_packed
from compress.methods.kmeans import weighted_kmeans_rows
from compress.methods.squeezellm import SqueezeLLM, SqueezeLLMParams, squeezellm_quantize
from compress.model.targets import discover


def _heavy_tailed(rows=64, columns=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    weight[torch.rand(rows, columns, generator=generator) < 0.01] *= 10  # a few large weights, as in LLMs
    fisher = torch.rand(rows, columns, generator=generator).pow(4)  # a few sensitive weights
    return weight, fisher


def _optimal_kmeans_1d(values: list[float], k: int) -> list[float]:
    """Exact 1-D k-means (unweighted) by trying every split of the sorted values into k runs."""
    values = sorted(values)
    best = None
    for cuts in itertools.combinations(range(1, len(values)), k - 1):
        runs = [values[a:b] for a, b in zip((0, *cuts), (*cuts, len(values)))]
        cost = sum(sum((v - sum(run) / len(run)) ** 2 for v in run) for run in runs)
        if best is None or cost < best[0]:
            best = (cost, [sum(run) / len(run) for run in runs])
    return best[1]


def test_kmeans_with_equal_weights_is_plain_kmeans():
    assert weighted_kmeans_rows(torch.tensor([[0.0, 1, 2, 10, 11, 12, 20, 21, 22]]), torch.ones(1, 9), 3)[0].tolist() == [[1, 11, 21]]
    generator = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(4, 4, generator=generator) * 0.3 + centre for centre in (-3.0, 0.0, 2.0)], dim=1)
    for weight in (1.0, 0.25):
        centroids, assignment = weighted_kmeans_rows(rows, torch.full_like(rows, weight), 3)
        for row in range(4):
            expected = torch.tensor(_optimal_kmeans_1d(rows[row].tolist(), 3))
            assert torch.allclose(centroids[row], expected, atol=1e-5)
        assert torch.equal(assignment, (rows.unsqueeze(-1) - centroids.unsqueeze(1)).abs().argmin(-1))


def test_kmeans_weights_and_valid_mask_matter():
    values = torch.tensor([[0.0, 1, 2, 10, 11, 12, 20, 21, 22]])
    weights = torch.ones_like(values)
    weights[0, 3] = 1000.0
    centroids, _ = weighted_kmeans_rows(values, weights, 3)
    assert abs(centroids[0, 1].item() - 10) < 0.01  # pulled onto the heavy value (unweighted: 11)
    values = torch.tensor([[0.0, 0.5, 4, 10, 11, 12, 20, 21, 22]])
    valid = torch.ones_like(values, dtype=torch.bool)
    valid[0, 6:] = False  # the last cluster takes no part: the others split in three
    centroids, assignment = weighted_kmeans_rows(values, torch.ones_like(values), 3, valid=valid)
    assert torch.allclose(centroids[0], torch.tensor(_optimal_kmeans_1d([0, 0.5, 4, 10, 11, 12], 3)))
    assert assignment[0, 6:].tolist() == [2, 2, 2]  # still each value's nearest centroid


@pytest.mark.parametrize("fractions", [(0.0, 0.0), (0.0045, 0.0005)])
def test_lossless_when_the_table_holds_every_value(fractions):
    generator = torch.Generator().manual_seed(0)
    palette = torch.randn(32, 8, generator=generator).half().float()  # float16-representable values
    weight = palette.gather(1, torch.randint(0, 8, (32, 128), generator=generator))
    weight[:, :3] = torch.randn(32, 3, generator=generator).half().float() * 8  # 11 distinct values a row
    params = SqueezeLLMParams(bits=4, outlier_fraction=fractions[0], sensitive_fraction=fractions[1])
    quantized, _ = squeezellm_quantize(weight, torch.rand(32, 128, generator=generator), params)
    assert torch.equal(quantized, weight)


def test_packed_form_round_trips_bit_for_bit(tmp_path):
    weight, fisher = _heavy_tailed()
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    weight = weight * keep
    result = SqueezeLLM(SqueezeLLMParams(bits=3)).compress_target(weight, {"fisher": fisher}, keep)
    packed = result.quantized
    assert packed.lut.dtype == torch.float16 and packed.lut.shape == (64, 8) and packed.group_size == 256
    write_packed(tmp_path / "p.safetensors", {"layer": packed})
    read = read_packed(tmp_path / "p.safetensors")["layer"]
    assert torch.equal(read.dequantize(), result.weight) and torch.equal(read.to("cpu").dequantize(), result.weight)
    # at most 2^bits values a row, outliers aside
    rows, cols = read.outliers.positions()
    rest = result.weight.clone()
    rest[rows, cols] = float("nan")
    assert all(row[~row.isnan() & keep[i]].unique().numel() <= 8 for i, row in enumerate(rest))


def test_outliers_are_the_requested_fractions_of_kept_weights():
    weight, fisher = _heavy_tailed()
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    weight = weight * keep
    params = SqueezeLLMParams(bits=3, outlier_fraction=0.01, sensitive_fraction=0.005)
    quantized, packed = squeezellm_quantize(weight, fisher, params, keep)
    kept = int(keep.sum())
    assert packed.outliers.count == round(0.01 * kept) + round(0.005 * kept)
    rows, cols = packed.outliers.positions()
    assert keep[rows, cols].all() and (quantized[~keep] == 0).all()
    chosen = torch.zeros_like(keep)
    chosen[rows, cols] = True
    assert chosen.view(-1)[torch.where(keep, fisher, -1.0).argmax()]  # the most sensitive kept weight
    assert chosen.view(-1)[torch.where(keep, weight.abs(), -1.0).argmax()]  # the largest kept weight
    assert torch.equal(quantized[chosen], weight[chosen].half().float())
    none = SqueezeLLMParams(bits=3, outlier_fraction=0.0, sensitive_fraction=0.0)
    assert squeezellm_quantize(weight, fisher, none, keep)[1].outliers is None


def test_dense_and_sparse_beats_dense_only_and_fisher_weighting_helps():
    weight, fisher = _heavy_tailed(seed=3)
    dense_only = SqueezeLLMParams(bits=3, outlier_fraction=0.0, sensitive_fraction=0.0)
    errors = {}
    for name, params, sensitivity in [("dense", dense_only, None), ("sparse", SqueezeLLMParams(bits=3), None),
                                      ("fisher", dense_only, fisher)]:
        quantized, _ = squeezellm_quantize(weight, sensitivity, params)
        errors[name] = ((quantized - weight).square() * fisher).sum().item()
        errors[name + "_plain"] = (quantized - weight).square().sum().item()
    assert errors["sparse_plain"] < 0.8 * errors["dense_plain"]
    assert errors["fisher"] < 0.85 * errors["dense"]  # the error where the loss is sensitive


def test_uniform_weighting_is_plain_kmeans_whatever_the_fisher_values():
    weight, fisher = _heavy_tailed(seed=4)
    uniform = SqueezeLLMParams(bits=3, outlier_fraction=0.0, sensitive_fraction=0.0, weighting="uniform")
    with_fisher, _ = squeezellm_quantize(weight, fisher, uniform)
    without, _ = squeezellm_quantize(weight, None, SqueezeLLMParams(bits=3, outlier_fraction=0.0, sensitive_fraction=0.0))
    assert torch.equal(with_fisher, without)
    # the sensitive values are still chosen by the Fisher diagonal
    picked = squeezellm_quantize(weight, fisher, uniform.model_copy(update={"sensitive_fraction": 0.01}))[1].outliers
    rows, columns = picked.positions()
    assert fisher[rows, columns].min() >= fisher.flatten().topk(picked.count).values.min()


def test_group_size_is_refused():
    with pytest.raises(ValueError, match="group_size does not apply"):
        SqueezeLLMParams(group_size=128)


def _per_sequence_fisher(model, targets, sequences):
    """The reference's way: one backward per sequence, squared gradients summed."""
    totals = {t.name: torch.zeros(t.weight.shape) for t in targets}
    for sequence in sequences:
        model.zero_grad(set_to_none=True)
        model(input_ids=sequence[None], labels=sequence[None]).loss.backward()
        for t in targets:
            grad = getattr(t.module, t.param_name).grad
            totals[t.name] += (grad if t.expert is None else grad[t.expert]).square()
    model.zero_grad(set_to_none=True)
    return totals


def test_fisher_diagonal_of_the_embedded_model():
    from compress.model.load import load_model
    from compress.recipe import ModelSpec

    model = load_model(ModelSpec()).model
    targets = discover(model).targets
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    one = fisher_diagonal(model, targets, [ids[:2], ids[2:]], "cpu")
    two = fisher_diagonal(model, targets, [ids], "cpu", chunk_size=2)  # chunks of 2 and 1
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(p.grad is None and p.requires_grad for p in model.parameters()) and not model.training
    expected = _per_sequence_fisher(model, targets, ids)
    for t in targets:
        assert one[t.name].shape == t.weight.shape and one[t.name].dtype == torch.float32
        assert (one[t.name] >= 0).all() and (one[t.name] > 0).any()
        assert torch.allclose(one[t.name], two[t.name], rtol=1e-4, atol=1e-6 * one[t.name].max())
        assert torch.allclose(one[t.name], expected[t.name], rtol=1e-4, atol=1e-6 * one[t.name].max())


def test_fisher_diagonal_of_fused_experts_is_their_slice():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True)
    model = MixtralForCausalLM(config).eval()
    targets = discover(model).targets
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    fisher = fisher_diagonal(model, targets, [ids], "cpu", chunk_size=2)
    expected = _per_sequence_fisher(model, targets, ids)
    assert any(t.is_expert for t in targets)
    for t in targets:
        assert fisher[t.name].shape == t.weight.shape
        assert torch.allclose(fisher[t.name], expected[t.name], rtol=1e-4, atol=1e-6 * expected[t.name].max())
