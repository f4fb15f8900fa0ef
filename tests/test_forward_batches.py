"""Calibration batches joined into larger forwards: the same statistics and next-block inputs as one batch a
forward (up to float summation order), on a dense LLaMA and a fused-expert MoE; and what cannot be joined is
run one batch at a time."""

import pytest
import torch

from compress.calibration.capture import BlockInputs, capture_block_inputs
from compress.calibration.data import batches, calibration_tokens
from compress.calibration.forward_batches import block_outputs, forward_group, join, run_block
from compress.calibration.layerwise import PlannedStage, run_layerwise
from compress.calibration.statistics import gather
from compress.methods.wanda import Wanda
from compress.model.load import load_model
from compress.model.targets import discover
from compress.recipe import CalibrationSpec, ModelSpec
from compress.state import CompressionState

CALIBRATION = CalibrationSpec(nsamples=10, seqlen=48, batch_size=3)  # batches of 3, 3, 3 and 1


def _statistics_and_outputs(model, tokenizer, group):
    layout = discover(model)
    tokens, _ = calibration_tokens(CALIBRATION, tokenizer)
    inputs = capture_block_inputs(model, layout, batches(tokens, 3), torch.device("cpu"))
    block = layout.blocks[0]
    targets = [t for t in layout.targets if t.block == 0]
    with torch.no_grad():
        with gather(targets, ("hessian", "input_sq_norm")) as collected:
            run_block(block, inputs, group)
        block_outputs(block, inputs, group)
    return {name: stats.values() for name, stats in collected.items()}, {n: s.tokens for n, s in collected.items()}, inputs


@pytest.mark.parametrize("which", ["llama", "mixtral"])
def test_joined_forwards_give_the_statistics_and_outputs_of_single_batches(which, tiny_mixtral):
    loaded = load_model(ModelSpec(device="cpu") if which == "llama" else ModelSpec(source=str(tiny_mixtral), device="cpu"))
    single, tokens_single, outputs_single = _statistics_and_outputs(loaded.model, loaded.tokenizer, 1)
    joined, tokens_joined, outputs_joined = _statistics_and_outputs(loaded.model, loaded.tokenizer, 3)
    assert tokens_single == tokens_joined and sum(tokens_single.values()) > 0
    for name, values in single.items():
        for statistic, value in values.items():
            torch.testing.assert_close(joined[name][statistic], value, rtol=1e-5, atol=1e-5 * float(value.abs().max()))
    assert [item.hidden.shape for item in outputs_joined] == [item.hidden.shape for item in outputs_single]  # split back per batch
    for a, b in zip(outputs_single, outputs_joined, strict=True):
        torch.testing.assert_close(b.hidden, a.hidden, rtol=1e-5, atol=1e-5)


def test_a_whole_pass_with_joined_forwards_gives_the_same_masks():
    def run(group):
        loaded = load_model(ModelSpec(device="cpu"))
        layout = discover(loaded.model)
        tokens, _ = calibration_tokens(CALIBRATION, loaded.tokenizer)
        state = CompressionState()
        outcome = run_layerwise(loaded.model, layout, [PlannedStage(Wanda(Wanda.Params(sparsity=0.5)), layout.targets)], state,
                                batches(tokens, 3), torch.device("cpu"), forward_group=group)
        return state, outcome

    state_1, outcome_1 = run(None)  # on the CPU the default is one batch a forward
    state_4, outcome_4 = run(4)
    assert (outcome_1.forward_group, outcome_4.forward_group) == (1, 4)
    assert outcome_1.stages[0].tokens == outcome_4.stages[0].tokens
    for name in state_1.targets:
        differ = (state_1.mask(name) != state_4.mask(name)).float().mean()
        assert differ < 1e-3, name  # a near-tie in Wanda's score may fall the other way in another summation order


def test_batches_whose_arguments_differ_run_one_at_a_time():
    calls = []

    class Block(torch.nn.Module):
        def forward(self, hidden, scale):
            calls.append(hidden.shape[0])
            return hidden * scale

    shared = torch.ones(2, 4)
    same = [BlockInputs(torch.full((2, 3, 4), float(i)), (), {"scale": 2.0}) for i in range(3)]
    differ = [BlockInputs(torch.ones(2, 3, 4), (), {"scale": s}) for s in (2.0, 3.0)]
    per_sequence = [BlockInputs(torch.ones(2, 3, 4), (shared * i,), {}) for i in range(2)]
    assert join(same).hidden.shape == (6, 3, 4) and join(differ) is None
    assert torch.equal(join(per_sequence).args[0], torch.cat([shared * 0, shared * 1]))  # leading batch dimension: joined
    block_outputs(Block(), same, group=2)
    assert calls == [4, 2] and [float(item.hidden[0, 0, 0]) for item in same] == [0.0, 2.0, 4.0]
    calls.clear()
    block_outputs(Block(), differ, group=2)
    assert calls == [2, 2] and [float(item.hidden[0, 0, 0]) for item in differ] == [2.0, 3.0]


def test_small_batches_are_joined_on_the_gpu_only_up_to_enough_tokens():
    from compress.calibration.forward_batches import ENOUGH_TOKENS

    assert forward_group(lambda: None, 16, 128, torch.device("cpu")) == 1
    if torch.cuda.is_available():
        device = torch.device("cuda")
        probe = lambda: torch.empty(2**20, device=device)  # noqa: E731  (4 MiB a batch: all fit)
        assert forward_group(probe, 64, ENOUGH_TOKENS // 8, device) == 8
        assert forward_group(probe, 4, ENOUGH_TOKENS // 8, device) == 4
        assert forward_group(probe, 16, ENOUGH_TOKENS, device) == 1
