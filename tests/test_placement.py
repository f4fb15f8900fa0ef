"""Where blocks are worked on: in place when they already live on the compute device, else copied up
one at a time and written back into the very host tensors they came from; masks packed where they lie."""

import pytest
import torch

from compress.calibration.data import batches, calibration_tokens
from compress.calibration.layerwise import PlannedStage, run_layerwise
from compress.calibration.placement import BlockPlacement, module_tensors
from compress.methods.gptq import GPTQ
from compress.methods.magnitude import Magnitude
from compress.methods.wanda import Wanda
from compress.model.load import load_model
from compress.model.targets import discover
from compress.recipe import CalibrationSpec, ModelSpec
from compress.state import CompressionState, TargetState

CALIBRATION = CalibrationSpec(nsamples=8, seqlen=64, batch_size=4)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(model, tokenizer, device, stages_of):
    layout = discover(model)
    tokens, _ = calibration_tokens(CALIBRATION, tokenizer)
    state = CompressionState()
    outcome = run_layerwise(model, layout, stages_of(layout), state, batches(tokens, 4), device)
    return state, outcome


def _wanda_then_gptq(layout):
    return [PlannedStage(Wanda(Wanda.Params(sparsity=0.5)), layout.targets),
            PlannedStage(GPTQ(GPTQ.Params(bits=4, group_size=32)), layout.targets)]


def test_blocks_on_the_compute_device_stay_where_they_are():
    loaded = load_model(ModelSpec(device="cpu"))
    pointers = {name: p.data_ptr() for name, p in loaded.model.named_parameters()}
    _, outcome = _run(loaded.model, loaded.tokenizer, torch.device("cpu"), _wanda_then_gptq)
    assert outcome.placement == "resident"
    assert pointers == {name: p.data_ptr() for name, p in loaded.model.named_parameters()}
    _, outcome = _run(loaded.model, loaded.tokenizer, torch.device("cpu"),
                      lambda layout: [PlannedStage(Magnitude(Magnitude.Params(sparsity=0.5)), layout.targets)])
    assert outcome.placement == "in place"  # no calibration data: nothing runs, nothing moves


def test_mask_packed_on_its_device_reads_back_bit_for_bit():
    mask = torch.rand(37, 53, generator=torch.Generator().manual_seed(0)) > 0.4
    entry = TargetState()
    entry.mask = mask
    assert entry.packed_mask.device.type == "cpu" and entry.packed_mask.numel() == (37 * 53 + 7) // 8
    assert torch.equal(entry.mask, mask) and torch.equal(entry.mask_on(torch.device("cpu")), mask)


def test_release_writes_into_the_home_tensors_and_points_back_at_them(monkeypatch):
    """The swap logic on the CPU: an upload that copies (as one to a GPU does), a change on the copy,
    then the release: the change lands in the very tensors the block started with."""
    blocks = torch.nn.ModuleList([torch.nn.Linear(8, 4) for _ in range(2)])
    home = [{n: (p.data, p.data_ptr()) for n, p in b.named_parameters()} for b in blocks]
    placement = BlockPlacement(blocks, torch.device("cpu"), moves=True)
    monkeypatch.setattr(placement, "_elsewhere", lambda index: True)  # as if the device were elsewhere
    monkeypatch.setattr(placement, "_upload", lambda index: ({n: t.clone() for n, t in module_tensors(blocks[index]).items()}, None))
    for index, block in enumerate(blocks):
        placement.fetch(index)
        assert block.weight.data_ptr() != home[index]["weight"][1]  # working on the copy
        with torch.no_grad():
            block.weight.add_(1.0)
        placement.release(index)
        for name, parameter in block.named_parameters():
            tensor, pointer = home[index][name]
            assert parameter.data_ptr() == pointer and torch.equal(parameter, tensor)
        assert (block.weight != 0).all()


def test_a_block_read_after_the_start_is_moved_when_its_turn_comes(monkeypatch):
    """A streamed model's blocks lie on meta until read (onto the host) at their turn: whether a block moves is
    decided then, block by block, not from where the blocks were when the pass began."""
    with torch.device("meta"):
        blocks = torch.nn.ModuleList([torch.nn.Linear(8, 4) for _ in range(2)])
    placement = BlockPlacement(blocks, torch.device("meta"), moves=True)  # "meta" stands for a device elsewhere
    assert placement.mode == "resident"  # nothing read, nothing moved yet
    uploads = []
    monkeypatch.setattr(placement, "_upload", lambda index: uploads.append(index) or ({}, None))
    blocks[0].to_empty(device="cpu")  # the handler reads block 0 onto the host
    placement.fetch(0)
    assert uploads == [0] and placement.mode == "block by block"
    resident = BlockPlacement(torch.nn.ModuleList([torch.nn.Linear(8, 4)]), torch.device("cpu"), moves=True)
    resident.fetch(0)
    assert resident.mode == "resident" and not resident._host


def test_capture_points_the_modules_outside_the_blocks_back_at_their_own_tensors(monkeypatch):
    """The capture's move of the modules outside the blocks copies them (as one to a GPU does); afterwards they
    point at their own tensors again, not at copies in fresh memory."""
    from compress.calibration import capture

    loaded = load_model(ModelSpec(device="cpu"))
    layout = discover(loaded.model)
    pointers = {name: p.data_ptr() for name, p in loaded.model.named_parameters()}
    monkeypatch.setattr(capture, "move_loaded", lambda model, device: model._apply(lambda t: t.clone()))
    tokens, _ = calibration_tokens(CALIBRATION, loaded.tokenizer)
    captured = capture.capture_block_inputs(loaded.model, layout, batches(tokens, 4), torch.device("cpu"))
    assert len(captured) == 2
    assert pointers == {name: p.data_ptr() for name, p in loaded.model.named_parameters()}


def test_a_device_named_with_or_without_its_index_is_one_device():
    from compress.calibration.placement import _same_device

    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    assert not _same_device(torch.device("cpu"), torch.device("meta"))
    if torch.cuda.is_available():
        current = torch.cuda.current_device()
        assert _same_device(torch.device("cuda"), torch.device("cuda", current))
        assert not _same_device(torch.device("cuda"), torch.device("cpu"))


@cuda
def test_blocks_streamed_to_the_gpu_give_the_resident_result_and_come_home_in_place():
    """A host-resident model compressed on the GPU block by block (each next block uploaded ahead on a
    side stream) gives the masks and weights of the same model kept on the GPU throughout, and its
    weights are written back into their original host tensors."""
    device = torch.device("cuda")
    streamed = load_model(ModelSpec(device="cuda"))
    streamed.model.to(torch.bfloat16)
    resident = load_model(ModelSpec(device="cuda"))
    resident.model.to(device, torch.bfloat16)
    pointers = {name: p.data_ptr() for name, p in streamed.model.named_parameters()}
    state_s, outcome_s = _run(streamed.model, streamed.tokenizer, device, _wanda_then_gptq)
    state_r, outcome_r = _run(resident.model, resident.tokenizer, device, _wanda_then_gptq)
    assert (outcome_s.placement, outcome_r.placement) == ("block by block", "resident")
    assert pointers == {name: p.data_ptr() for name, p in streamed.model.named_parameters()}
    assert all(p.device.type == "cpu" for p in streamed.model.parameters())
    for name in state_r.targets:
        assert torch.equal(state_s.mask(name), state_r.mask(name)), name
        assert torch.equal(state_s.mask(name, device), state_r.mask(name).to(device)), name
    for (name, a), b in zip(streamed.model.named_parameters(), resident.model.parameters(), strict=True):
        assert torch.equal(a, b.cpu()), name


@cuda
def test_placement_uploads_ahead_and_releases_into_host_memory():
    blocks = torch.nn.ModuleList([torch.nn.Linear(64, 32) for _ in range(3)])
    hosts = [{n: p.data for n, p in b.named_parameters()} for b in blocks]
    placement = BlockPlacement(blocks, torch.device("cuda"), moves=True)
    try:
        placement.prefetch(1)
        for index in range(3):
            block = placement.fetch(index)
            if index + 1 < 3:
                placement.prefetch(index + 1)
            assert block.weight.is_cuda
            with torch.no_grad():
                block.weight.mul_(2)
            placement.release(index)
            assert not block.weight.is_cuda and block.weight.data_ptr() == hosts[index]["weight"].data_ptr()
    finally:
        placement.close()
    assert all(torch.equal(b.weight, hosts[i]["weight"]) for i, b in enumerate(blocks))


@cuda
def test_write_behind_points_a_block_home_once_its_copy_is_done():
    """With write_behind a released block keeps its device tensors (same values) until the next release or
    close, which point it back at its host tensors, filled with what was computed on the device."""
    blocks = torch.nn.ModuleList([torch.nn.Linear(256, 128) for _ in range(3)])
    hosts = [b.weight.data for b in blocks]
    expected = [b.weight.detach().clone() * 3 for b in blocks]
    placement = BlockPlacement(blocks, torch.device("cuda"), moves=True, write_behind=True)
    try:
        for index, block in enumerate(blocks):
            placement.fetch(index)
            with torch.no_grad():
                block.weight.mul_(3)
            placement.release(index)
            assert block.weight.is_cuda  # its copy home may still be running
            if index:
                previous = blocks[index - 1].weight
                assert not previous.is_cuda and previous.data_ptr() == hosts[index - 1].data_ptr()
    finally:
        placement.close()
    for block, host, value in zip(blocks, hosts, expected, strict=True):
        assert block.weight.data_ptr() == host.data_ptr() and torch.equal(block.weight, value)
