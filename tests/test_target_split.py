"""A block's targets compressed in parallel (compress/calibration/target_split.py): the assignment (every target
once, expert batches whole, balanced, deterministic), and two CPU processes (gloo) that each compress their share
of the targets and hold afterwards what one process compressing all of them holds.

The processes are spawned once for the module and run every case: the layer-wise engine on the embedded model
(wanda, gptq, spqr) and on the tiny Mixtral (qmoe), with 2 calibration batches, one per process, so the summed
statistics are the single process's bit for bit (x + y either way), and so must every result be. Each process
runs one thread; the single-process references run in the same processes after the group is torn down."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import sibling_statistics

from compress.calibration.expert_batches import expert_groups
from compress.calibration.target_split import SPLIT_VARIABLE, assign, unit_work, work_units
from compress.methods import get_method
from compress.model.load import embedded_model_path
from compress.model.targets import Target

CASES = {
    "wanda": ("embedded", {"sparsity": 0.5}),
    "gptq": ("embedded", {"bits": 4, "group_size": 32}),
    "spqr": ("embedded", {"bits": 3, "group_size": 16, "qq_groupsize": 16, "outlier_threshold": 0.2}),
    "qmoe": ("mixtral", {"grid": "ternary", "damp": 0.1}),
}
SPLIT_OFF = "gptq"  # also run with COMPRESS_SPLIT_TARGETS=0


def _method(name: str):
    method_class = get_method(name)
    return method_class(method_class.Params(**CASES[name][1]))


def _load(model: str, mixtral: str):
    from compress.model.load import load_model
    from compress.model.targets import discover
    from compress.recipe import ModelSpec

    loaded = load_model(ModelSpec(source=str(embedded_model_path()) if model == "embedded" else mixtral, device="cpu"))
    return loaded.model, discover(loaded.model)


def _batches(vocab: int) -> list[torch.Tensor]:
    return list(torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(1)).split(2))  # 2 batches of 2 x 32


def _compress(name: str, mixtral: str, batches: list[torch.Tensor]) -> dict:
    """The engine's run of case `name` on `batches`: every target's weights and state entry, the outcome, and how
    many targets this process compressed itself (compress_target calls, experts in compress_experts batches)."""
    from compress.calibration.layerwise import PlannedStage, run_layerwise
    from compress.state import CompressionState

    model, layout = _load(CASES[name][0], mixtral)
    method = _method(name)
    counted = [0]
    core, experts, siblings = method.compress_target, method.compress_experts, method.compress_siblings

    def compress_target(*args, **kwargs):
        counted[0] += 1
        return core(*args, **kwargs)

    def compress_experts(weights, *args):
        found = experts(weights, *args)
        counted[0] += 0 if found is None else weights.shape[0]
        return found

    def compress_siblings(weights, *args):
        found = siblings(weights, *args)
        counted[0] += 0 if found is None else len(weights)
        return found

    method.compress_target, method.compress_experts, method.compress_siblings = compress_target, compress_experts, compress_siblings
    state = CompressionState()
    stage = PlannedStage(method, method.restrict_targets(layout.targets), label=name)
    outcome = run_layerwise(model, layout, [stage], state, batches, torch.device("cpu"), measure_error=True).stages[0]
    return {
        "weights": {t.name: t.weight.clone() for t in stage.targets},
        "state": {name: vars(entry) for name, entry in state.targets.items()},
        "outcome": {k: v for k, v in vars(outcome).items() if k != "seconds"},
        "computed": counted[0],
    }


def _worker(rank: int, world: int, store: str, mixtral: str, out: str) -> None:
    torch.set_num_threads(1)  # the CI's two cores; never in the test process (its thread count stays as it is)
    vocab = {model: json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
             for model, folder in (("embedded", embedded_model_path()), ("mixtral", mixtral))}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {name: _compress(name, mixtral, _batches(vocab[model])[rank::world]) for name, (model, _) in CASES.items()}
        os.environ[SPLIT_VARIABLE] = "0"
        results[f"{SPLIT_OFF}-off"] = _compress(SPLIT_OFF, mixtral, _batches(vocab[CASES[SPLIT_OFF][0]])[rank::world])
        del os.environ[SPLIT_VARIABLE]
        dist.barrier()  # both ranks done before the group is torn down
    finally:
        dist.destroy_process_group()
    for index, (name, (model, _)) in enumerate(CASES.items()):  # one process now: the references, half each
        if index % world == rank:
            results[f"{name}-single"] = _compress(name, mixtral, _batches(vocab[model]))
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mixtral) -> list[dict]:
    folder = tmp_path_factory.mktemp("target-split")
    mp.start_processes(_worker, args=(2, str(folder / "store"), str(tiny_mixtral), str(folder)), nprocs=2, join=True, start_method="spawn")
    loaded = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return [{**loaded[0], **{k: v for k, v in loaded[1].items() if k.endswith("-single")}}, loaded[1]]


def _assert_same(one, other, where: str) -> None:
    """Equal bit for bit: tensors (dtype, shape, bits), dataclasses field by field, containers (and dict order)."""
    if isinstance(one, torch.Tensor):
        assert isinstance(other, torch.Tensor) and one.dtype == other.dtype and one.shape == other.shape, where
        assert torch.equal(one.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), f"{where}: the bits differ"
    elif hasattr(one, "__dataclass_fields__"):
        assert type(one) is type(other), where
        _assert_same(vars(one), vars(other), where)
    elif isinstance(one, dict):
        assert list(one) == list(other), f"{where}: keys {list(one)} against {list(other)}"
        for key in one:
            _assert_same(one[key], other[key], f"{where}.{key}")
    elif isinstance(one, (list, tuple)):
        assert type(one) is type(other) and len(one) == len(other), where
        for i, (a, b) in enumerate(zip(one, other)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert one == other, f"{where}: {one!r} against {other!r}"


def _without_seconds(run: dict) -> dict:
    outcome = dict(run["outcome"])
    assert all(s >= 0 for s in outcome.pop("target_seconds").values())
    return {**run, "outcome": outcome, "computed": None}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_hold_what_one_computes(runs, name):
    """Both processes hold the same weights, masks, packed forms, errors, seconds, fallbacks, counts; the
    single process's bit for bit (its own seconds aside)."""
    _assert_same(runs[0][name] | {"computed": None}, runs[1][name] | {"computed": None}, f"{name}: rank 0 against rank 1")
    _assert_same(_without_seconds(runs[0][name]), _without_seconds(runs[0][f"{name}-single"]), f"{name}: two processes against one")
    assert list(runs[0][name]["outcome"]["target_seconds"]) == list(runs[0][f"{name}-single"]["outcome"]["target_seconds"])
    entries = runs[0][name]["state"].values()
    if name == "wanda":
        assert all(entry["packed_mask"] is not None for entry in entries)
    else:
        assert all(entry["quantized"] is not None for entry in entries)
    if name == "spqr":
        assert sum(entry["quantized"].outliers.count for entry in entries) > 0  # outliers came across too


@pytest.mark.parametrize("name", list(CASES))
def test_each_process_computes_its_share(runs, name, tiny_mixtral):
    """compress_target (and compress_experts, compress_siblings) ran for every target once in all: each process's
    share, as `assign` deals them out (siblings, the targets that read one input, go together)."""
    from compress.model.load import load_model
    from compress.model.targets import discover
    from compress.recipe import ModelSpec

    model = CASES[name][0]
    layout = discover(load_model(ModelSpec(source=str(embedded_model_path()) if model == "embedded" else str(tiny_mixtral),
                                           device="cpu")).model)
    method = _method(name)
    targets = method.restrict_targets(layout.targets)
    expected = [0, 0]
    for block in layout.by_block(targets):
        units = work_units(method, block, sibling_statistics(block))
        for unit, owner in zip(units, assign([unit_work(method, u, {}) for u in units], 2)):
            expected[owner] += len(unit)
    assert [runs[r][name]["computed"] for r in range(2)] == expected and min(expected) > 0 and sum(expected) == len(targets)
    assert runs[0][f"{name}-single"]["computed"] == len(targets)


def test_split_off_computes_everything_everywhere(runs):
    """COMPRESS_SPLIT_TARGETS=0: each process compresses every target, and the result is the split's."""
    off, on = runs[0][f"{SPLIT_OFF}-off"], runs[0][SPLIT_OFF]
    assert off["computed"] == runs[1][f"{SPLIT_OFF}-off"]["computed"] == len(off["weights"])
    _assert_same(_without_seconds(off), _without_seconds(on), "split off against on")


def _fake_targets(shapes: list[tuple[int, int]], experts: int = 0, in_features: int = 64) -> list[Target]:
    targets = [Target(f"linear{i}", torch.nn.Linear(cols, rows, bias=False), "weight", 0) for i, (rows, cols) in enumerate(shapes)]
    fused = torch.nn.Module()
    fused.down_proj = torch.nn.Parameter(torch.zeros(experts, 32, in_features))
    return targets + [Target(f"expert{e}", fused, "down_proj", 0, expert=e) for e in range(experts)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_assignment_deals_every_target_once_and_balanced(world):
    gptq, qmoe = get_method("gptq")(get_method("gptq").Params(bits=4)), get_method("qmoe")(get_method("qmoe").Params())
    shapes = [(128, 128), (64, 128), (64, 128), (128, 128), (384, 128), (384, 128), (128, 384)]
    for method, targets in ((gptq, _fake_targets(shapes)), (qmoe, _fake_targets(shapes, experts=8)), (gptq, _fake_targets(shapes, experts=8))):
        units = work_units(method, targets)
        assert sorted(t.name for unit in units for t in unit) == sorted(t.name for t in targets)  # every target once
        batches = expert_groups(method, targets)
        assert [unit for unit in units if len(unit) > 1] == batches  # an expert batch is one unit, whole
        assert (len(batches) == 1 and len(batches[0]) == 8) if method is qmoe else not batches
        work = [unit_work(method, unit, {}) for unit in units]
        owners = assign(work, world)
        assert owners == assign(work, world) and set(owners) <= set(range(world))  # the same on every call
        loads = [sum(w for w, o in zip(work, owners) if o == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(work)  # within the largest unit


def test_assignment_edge_cases():
    assert assign([], 3) == [] and assign([5.0], 1) == [0] and assign([1.0, 1.0, 1.0], 3) == [0, 1, 2]
    assert assign([1.0, 8.0, 3.0, 3.0, 2.0], 2) == [0, 0, 1, 1, 1]  # 8 + 1 | 3 + 3 + 2
    gptq = get_method("gptq")(get_method("gptq").Params(bits=4))
    (big, small) = _fake_targets([(4096, 4096), (64, 64)])
    assert unit_work(gptq, [big], {}) > 1000 * unit_work(gptq, [small], {})  # by the method's flops, not the count


def _command(tmp_path: Path, name: str, processes: int) -> dict:
    """`compress run --nproc N` on the embedded model, one thread a process, 2 calibration batches of 2 x 32 (one
    per process: the summed statistics are the single process's bit for bit); the report."""
    import subprocess
    import sys

    import yaml
    from conftest import fast_recipe
    from test_nproc import CLI

    recipe = tmp_path / f"{name}.yaml"
    calibration = {"nsamples": 4, "seqlen": 32, "batch_size": 2}
    recipe.write_text(yaml.safe_dump(fast_recipe({"method": name, **CASES[name][1]}, name=name, calibration=calibration)))
    out = tmp_path / f"{name}-nproc{processes}"
    command = [sys.executable, "-c", CLI, "run", str(recipe), "--out", str(out), "--no-track", "--quiet", "--nproc", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_HOME": str(tmp_path / f"home-{processes}")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", ["spqr"])  # end to end once (outliers, both statistic levels); Wanda, GPTQ, QMoE: engine level above
def test_command_line_two_processes_write_what_one_writes(tmp_path, name):
    """`compress run --nproc 2` (the split on, as by default) against one process: the very bytes of the packed
    model, the same report metrics to 4 digits and the same per-target table (seconds aside)."""
    from conftest import output_bytes
    from test_nproc import _same_metrics

    one, two = _command(tmp_path, name, 1), _command(tmp_path, name, 2)
    _same_metrics(one["metrics"], two["metrics"])
    assert output_bytes(tmp_path / f"{name}-nproc1") == output_bytes(tmp_path / f"{name}-nproc2")
    for report in (one, two):
        for target in report["targets"].values():
            target.pop("seconds")
    assert one["targets"] == two["targets"] and one["stages"][0]["layer_error_max"] == two["stages"][0]["layer_error_max"]
