"""DSnoT's core against properties that hold by construction, the closed-form reconstruction error
of a linear layer, and an independent transcription of the reference's loop (zyxxmu/DSnoT)."""

import pytest
import torch
from conftest import exported_tensors, fast_recipe

from compress.methods.dsnot import DSnoT, dsnot_refine
from compress.methods.sparsity import NM, prune_mask
from compress.methods.wanda import wanda_scores
from compress.pipeline.engine import run
from compress.recipe import validate_recipe


def _layer(rows=48, columns=256, tokens=1024, sequences=4, seed=0):
    """A linear layer's dense weight, inputs with non-zero feature means, and the statistics DSnoT uses."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    inputs = torch.randn(tokens, columns, generator=generator) * torch.rand(columns, generator=generator) * 2
    inputs += torch.randn(columns, generator=generator)
    stats = {
        "mean": inputs.mean(0) * tokens / sequences,  # per calibration sequence, as the reference
        "variance": inputs.var(0, unbiased=False),
        "sq_norm": inputs.pow(2).sum(0),
    }
    return weight, inputs, stats


def _wanda_mask(weight, stats, sparsity=0.5, pattern="unstructured"):
    return prune_mask(wanda_scores(weight, stats["sq_norm"]), sparsity, pattern)


def _refine(weight, keep, stats, group=None, **kwargs):
    return dsnot_refine(weight, weight * keep, keep, stats["mean"], stats["variance"], stats["sq_norm"], group, **kwargs)


def _expected_output_gap(dense, sparse, inputs, tokens_per_sequence):
    """e of every row in closed form: the mean difference of the layer's dense and sparse outputs over
    the calibration tokens (in the reference's units of one sequence)."""
    return (inputs @ dense.T - inputs @ sparse.T).mean(0) * tokens_per_sequence


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_keeps_the_zeros_of_every_row(sparsity):
    weight, _, stats = _layer()
    keep = _wanda_mask(weight, stats, sparsity)
    refined = _refine(weight, keep, stats)
    assert not torch.equal(refined, keep)  # it did swap
    assert torch.equal((~refined).sum(1), (~keep).sum(1))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_keeps_n_in_every_group(pattern):
    n, m = map(int, pattern.split(":"))
    weight, _, stats = _layer()
    keep = _wanda_mask(weight, stats, pattern=pattern)
    refined = _refine(weight, keep, stats, NM(n, m), update_threshold=0.0)
    assert not torch.equal(refined, keep)
    assert (refined.view(weight.shape[0], -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("group", [None, NM(2, 4)])
def test_each_swap_lowers_the_closed_form_error(group):
    """Every swap lowers |e| of its row (our default rule), measured on the layer's real outputs at
    every cycle where the row's mask changed."""
    weight, inputs, stats = _layer()
    keep = _wanda_mask(weight, stats, pattern="2:4" if group else "unstructured")
    per_sequence = inputs.shape[0] / 4
    previous_mask, previous_gap = keep, _expected_output_gap(weight, weight * keep, inputs, per_sequence).abs()
    swaps = 0
    for cycles in range(1, 30):
        mask = _refine(weight, keep, stats, group, max_cycle_time=cycles, update_threshold=0.0)
        gap = _expected_output_gap(weight, weight * mask, inputs, per_sequence).abs()
        changed = (mask != previous_mask).any(1)
        assert (gap[changed] < previous_gap[changed] - 1e-3).all()
        assert torch.allclose(gap[~changed], previous_gap[~changed], atol=1e-2)
        swaps += int(changed.sum())
        previous_mask, previous_gap = mask, gap
    assert swaps > 100


def test_default_rules_shrink_the_error_and_stop_below_the_threshold():
    weight, inputs, stats = _layer()
    keep = _wanda_mask(weight, stats, 0.7)
    per_sequence = inputs.shape[0] / 4
    before = _expected_output_gap(weight, weight * keep, inputs, per_sequence).abs()
    refined = _refine(weight, keep, stats, update_threshold=5.0)
    after = _expected_output_gap(weight, weight * refined, inputs, per_sequence).abs()
    assert after.mean() < 0.5 * before.mean()
    # a row already within the threshold is left as it was
    settled = before <= 5.0
    assert settled.any() and torch.equal(refined[settled], keep[settled])


def _reference_dsnot_unstructured(W, sum_metric_row, var, scaler_row, sparsity, max_cycle_time, update_threshold):
    """The reference's `prune_DSnoT` for a Wanda-initialised, unstructured row set (lib/prune.py),
    transcribed with its defaults (without_same_sign=True, pow_of_var_regrowing=1)."""
    DSnoT_metric = W * sum_metric_row.reshape((1, -1))
    initial_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    weight_mask = torch.zeros_like(initial_metric) == 1
    _, sorted_initial_indice = torch.sort(initial_metric, dim=-1, stable=True)
    sparsity_num = int(initial_metric.shape[1] * sparsity)
    res_sparsity_num = sorted_initial_indice.shape[1] - sparsity_num
    initial_prune_indices, initial_res_indices = torch.split(sorted_initial_indice, [sparsity_num, res_sparsity_num], dim=1)
    weight_mask.scatter_(1, initial_prune_indices, True)
    metric_for_regrowing = DSnoT_metric.clone()
    wanda_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    metric_for_regrowing.scatter_(1, initial_res_indices, 0)
    reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
    metric_for_regrowing /= torch.pow(var.reshape((1, -1)), 1)
    _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
    wanda_metric.scatter_(1, initial_prune_indices, float("inf"))
    wanda_res_indices, _ = torch.split(torch.sort(wanda_metric, dim=1, stable=True)[1], [res_sparsity_num, sparsity_num], dim=1)
    values = torch.gather(DSnoT_metric, 1, wanda_res_indices)
    # return_reorder_indice: negatives in order, then positives in reverse order
    order = []
    for row in values:
        positions = torch.arange(row.numel())
        order.append(torch.cat([positions[row < 0], positions[row > 0].flip(0)]))
    pruning_indices_block = torch.gather(wanda_res_indices, 1, torch.stack(order))
    rows = W.shape[0]
    regrow_ends = torch.zeros((rows, 2), dtype=torch.long)
    regrow_ends[:, 1] = regrowing_indices_block.shape[-1] - 1
    prune_ends = torch.zeros((rows, 2), dtype=torch.long)
    prune_ends[:, 1] = pruning_indices_block.shape[-1] - 1
    steps = torch.ones((rows, 2), dtype=torch.long)
    steps[:, 1] = -1
    update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
    cycle_time = 0
    while not (torch.all(update_mask == False) or cycle_time >= max_cycle_time):  # noqa: E712
        cycle_time += 1
        side = (reconstruction_error > 0).long()
        at = torch.gather(regrow_ends, 1, side)
        regrowing_indice = torch.gather(regrowing_indices_block, 1, at)
        regrowing_metric = DSnoT_metric.gather(1, regrowing_indice)
        regrow_ends.scatter_(1, side, at + steps.gather(1, side))
        side = (reconstruction_error < 0).long()
        at = torch.gather(prune_ends, 1, side)
        pruning_indice = torch.gather(pruning_indices_block, 1, at)
        pruning_metric = DSnoT_metric.gather(1, pruning_indice)
        prune_ends.scatter_(1, side, at + steps.gather(1, side))
        update_mask = update_mask & (abs(reconstruction_error) > update_threshold)
        weight_mask.scatter_(1, pruning_indice, update_mask)
        weight_mask.scatter_(1, regrowing_indice, ~update_mask)
        reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
        reconstruction_error -= torch.where(update_mask, regrowing_metric, torch.zeros_like(regrowing_metric))
    return ~weight_mask


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_matches_a_transcription_of_the_reference(sparsity):
    weight, inputs, stats = _layer(seed=3)
    sequences = 4
    reference = _reference_dsnot_unstructured(
        weight, inputs.sum(0) / sequences, stats["variance"], inputs.pow(2).sum(0) / sequences, sparsity, 50, 0.1
    )
    ours = _refine(weight, _wanda_mask(weight, stats, sparsity), stats, require_lower_error=False)
    assert torch.equal(ours, reference)
    assert not torch.equal(_refine(weight, _wanda_mask(weight, stats, sparsity), stats), reference)  # our default rule


def test_grown_weights_take_their_dense_value_and_no_value_changes():
    weight, inputs, stats = _layer(rows=8, columns=64)
    keep = _wanda_mask(weight, stats, 0.6)
    method = DSnoT(DSnoT.Params(pattern="unstructured", update_threshold=0.0))
    statistics = {"input_mean": inputs.mean(0), "input_variance": stats["variance"], "input_sq_norm": stats["sq_norm"],
                  "tokens_per_sequence": torch.tensor(inputs.shape[0] / 4)}
    result = method.compress_target(weight * keep, statistics, keep, dense=weight)
    assert not torch.equal(result.mask, keep)
    assert torch.equal(result.weight, weight * result.mask)


def test_recipe_stage_refines_wanda_and_keeps_sparsity(tmp_path):
    recipe = fast_recipe({"method": "wanda", "sparsity": 0.6}, {"method": "dsnot"}, evaluate={"dense": False})
    report = run(validate_recipe(recipe), tmp_path / "run")
    _, dsnot = report["stages"]
    assert dsnot["targets"] == 4 * 4  # q, k, v, o of the 4 blocks: the MLP is skipped by default
    assert dsnot["targets_changed"] > 0
    exported = exported_tensors(tmp_path / "run")
    for name in report["targets"]:  # Wanda's exact count of zeros in every row survives DSnoT
        pruned = exported[f"{name}.weight"] == 0
        assert (pruned.sum(1) == int(pruned.shape[1] * 0.6)).all()
    assert report["targets"]["model.layers.0.self_attn.q_proj"]["stages"] == ["wanda", "dsnot"]
    assert report["targets"]["model.layers.0.mlp.up_proj"]["stages"] == ["wanda"]


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"method": "dsnot"}], "no earlier stage pruned"),
        ([{"method": "wanda", "pattern": "2:4"}, {"method": "dsnot", "pattern": "4:8"}], "differs from the 2:4"),
        ([{"method": "wanda", "targets": {"include": ["*.mlp.*"]}}, {"method": "dsnot", "targets": {"include": ["*.mlp.*"]}}],
         "no target left"),
    ],
)
def test_planning_errors(stages, message, tmp_path):
    from compress.errors import CompressError

    with pytest.raises(CompressError, match=message):
        run(validate_recipe(fast_recipe(*stages)), tmp_path / "x")
    assert not (tmp_path / "x").exists()
