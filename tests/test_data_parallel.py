"""Data-parallel calibration (compress/calibration/distributed.py): two CPU processes (torch.distributed, gloo),
each with half the calibration batches, give the layer-wise engine's single-process result: the same masks,
weights equal up to float summation order, the same token counts."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress.calibration.layerwise import PlannedStage, run_layerwise
from compress.methods import get_method
from compress.model.targets import discover
from compress.state import CompressionState

METHODS = [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"sparsity": 0.5, "pattern": "2:4"}), ("gptq", {"bits": 4, "group_size": 32})]


def _model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _batches() -> list[torch.Tensor]:
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    return list(tokens.split(2))  # 4 batches of 2 sequences


def _compress(method: str, params: dict, batches: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    model = _model()
    layout = discover(model)
    method_class = get_method(method)
    stage = PlannedStage(method_class(method_class.Params(**params)), layout.targets, label=method)
    outcome = run_layerwise(model, layout, [stage], CompressionState(), batches, torch.device("cpu"))
    weights = {t.name: t.weight.detach().clone() for t in layout.targets}
    return weights, dict(outcome.stages[0].tokens)


def _worker(rank: int, world: int, store: str, method: str, params: dict, out: str) -> None:
    torch.set_num_threads(1)  # two processes on the CI's two cores (never in the test process: later tests compare thread-bound results)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        weights, tokens = _compress(method, params, _batches()[rank::world])
        if rank == 0:
            torch.save((weights, tokens), out)
        dist.barrier()  # both ranks done before the group is torn down (gloo aborts a rank torn down mid-exchange)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method, params", METHODS, ids=[m for m, _ in METHODS])
def test_two_processes_equal_one(tmp_path, method, params):
    single, single_tokens = _compress(method, params, _batches())
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), method, params, out), nprocs=2, join=True, start_method="spawn")
    parallel, parallel_tokens = torch.load(out)
    assert parallel_tokens == single_tokens and all(count == 8 * 32 for count in single_tokens.values())
    for name, weight in single.items():
        assert torch.equal(parallel[name] == 0, weight == 0), f"{name}: the masks differ"
        assert torch.allclose(parallel[name], weight, rtol=1e-4, atol=1e-5), f"{name}: max diff {(parallel[name] - weight).abs().max()}"


def test_one_process_is_untouched():
    from compress.calibration.distributed import sum_over_processes, total_over_processes, world_size

    assert not (dist.is_available() and dist.is_initialized()) or os.environ.get("WORLD_SIZE") == "1"
    tensor = torch.ones(3)
    sum_over_processes([tensor])
    assert world_size() == 1 and total_over_processes(7) == 7 and torch.equal(tensor, torch.ones(3))
