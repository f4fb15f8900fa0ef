"""A block's targets compressed in parallel by the processes of a data-parallel run (`--nproc N`).

After the statistics are summed (compress/calibration/distributed.py) every process holds all of the block's
inputs to compression: the summed statistics, the state (masks, packed forms), the weights and, for a stage
that refines a mask, the weights from before the first stage. So the block's targets are dealt out: each
process compresses its share, then every result goes from the process that computed it to all the others
(`TargetSplit.share`): the weights, the state's entry (mask bits, packed form, the stages that changed it)
and what the report reads (fallback, relative error, seconds, whether the weights changed). Afterwards every
process holds what one process compressing every target would hold, bit for bit (the methods are
deterministic: the same inputs give the same result on every process).

A unit of work is one target, or the targets the engine compresses together (`joint_groups`: a batch of
experts, siblings sharing one input): those go to one process whole. Units are balanced by their work
(`Method.flops`, which defaults to the weight's size): the largest first, each to the least loaded process
(the lowest rank on a tie). Every process computes the same assignment without a word exchanged, and no
process ends up with more than the largest unit above another.

Off with COMPRESS_SPLIT_TARGETS=0 (process 0's setting counts): every process compresses every target, as
before. In one process (or with the split off) nothing here communicates and every target is this process's.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from compress.calibration.distributed import _device, from_leader, rank, world_size
from compress.calibration.expert_batches import joint_groups
from compress.methods.base import TargetMethod
from compress.model.targets import Target
from compress.state import CompressionState

if TYPE_CHECKING:
    from compress.calibration.layerwise import StageOutcome

SPLIT_VARIABLE = "COMPRESS_SPLIT_TARGETS"


def split_enabled() -> bool:
    """Whether this run deals a block's targets out to its processes: world > 1 and process 0's
    COMPRESS_SPLIT_TARGETS not 0/false/no/off."""
    if world_size() == 1:
        return False
    return bool(from_leader(int(os.environ.get(SPLIT_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off"))))


def work_units(method: TargetMethod, targets: list[Target], statistics: dict[str, dict[str, torch.Tensor]] | None = None
               ) -> list[list[Target]]:
    """The targets as units of work, in target order (a unit at its first target): each batch the engine
    would compress together (experts, siblings: joint_groups) is one unit, every other target a unit of its own."""
    batch_of = {t.name: batch for batch in joint_groups(method, targets, statistics or {}) for t in batch}
    units, seen = [], set()
    for target in targets:
        unit = batch_of.get(target.name, [target])
        if unit[0].name not in seen:
            seen.add(unit[0].name)
            units.append(unit)
    return units


def unit_work(method: TargetMethod, unit: list[Target], tokens: dict[str, int]) -> float:
    """The unit's work: the method's flop estimate of each target, the weight's size where it gives none."""
    total = 0.0
    for target in unit:
        flops = float(method.flops(target, tokens.get(target.name, 0)))
        total += flops if math.isfinite(flops) and flops > 0 else float(target.numel)
    return total


def assign(work: list[float], world: int) -> list[int]:
    """The process of each unit of work: the largest first, each to the least loaded process (the lower
    index first among equal loads or equal units). Deterministic; the loads end within the largest unit of
    each other."""
    loads = [0.0] * world
    owners = [0] * len(work)
    for index in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        owner = min(range(world), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += work[index]
    return owners


@dataclass
class TargetSplit:
    """Who compresses which of a block's targets in one stage (`plan`), and the results shared (`share`)."""

    targets: list[Target]
    owner: dict[str, int]  # target name -> the process that compresses it
    active: bool  # False: one process, or the split off: every target is this process's, nothing is shared

    @classmethod
    def plan(cls, method: TargetMethod, targets: list[Target], tokens: dict[str, int], state: CompressionState,
             statistics: dict[str, dict[str, torch.Tensor]] | None = None) -> TargetSplit:
        """The owner of each target (`tokens`: calibration tokens by target, for the work estimate; `statistics`:
        theirs, which tell the siblings); `state` gets an entry for each target now, in target order, as one
        process compressing them in turn would."""
        if not split_enabled():
            return cls(targets, {t.name: rank() for t in targets}, False)
        for target in targets:
            state.get(target.name)
        units = work_units(method, targets, statistics)
        owners = assign([unit_work(method, unit, tokens) for unit in units], world_size())
        return cls(targets, {t.name: owner for unit, owner in zip(units, owners) for t in unit}, True)

    @property
    def mine(self) -> list[Target]:
        """This process's targets, in target order."""
        me = rank()
        return [t for t in self.targets if self.owner[t.name] == me]

    def share(self, state: CompressionState, changed: dict[str, bool], outcome: StageOutcome) -> None:
        """Every target's result, from the process that computed it, on every process: the weights (in
        place), `state`'s entries, `changed` (target -> whether its weights changed) and the outcome's
        per-target errors, seconds and fallbacks (in target order, as one process would have them)."""
        if not self.active:
            return
        me = rank()
        per_target = (outcome.errors, outcome.target_seconds, outcome.fallbacks)
        for source in range(world_size()):
            theirs = [t for t in self.targets if self.owner[t.name] == source]
            if not theirs:
                continue
            mine = [_record(t.name, state, changed, per_target) for t in theirs] if source == me else None
            records = broadcast_value(mine, source)
            for target, (name, packed_mask, shape, quantized, stages, was_changed, *found) in zip(theirs, records, strict=True):
                assert name == target.name, f"{name} received for {target.name}"
                broadcast_into(target.weight, source)
                if source == me:
                    continue
                entry = state.get(name)
                entry.packed_mask, entry.shape, entry.quantized, entry.stages = packed_mask, shape, quantized, stages
                changed[name] = was_changed
                for values, value in zip(per_target, found):
                    if value is not None:
                        values[name] = value
        for values in per_target:  # the block's entries in target order, after the earlier blocks'
            for target in self.targets:
                if target.name in values:
                    values[target.name] = values.pop(target.name)


def _record(name: str, state: CompressionState, changed: dict[str, bool], per_target: tuple[dict[str, Any], ...]) -> tuple:
    entry = state.get(name)
    return (name, entry.packed_mask, entry.shape, entry.quantized, list(entry.stages), changed[name],
            *(found.get(name) for found in per_target))


def broadcast_into(tensor: torch.Tensor, source: int) -> None:
    """`tensor` overwritten by process `source`'s (same shape and dtype everywhere), its bytes sent as
    they are; in place when it lies contiguous on the collective's device."""
    device = _device()
    carrier = tensor if tensor.device == device and tensor.is_contiguous() else tensor.detach().to(device).contiguous()
    if carrier.numel():
        dist.broadcast(carrier.reshape(-1).view(torch.uint8), source)
    if carrier is not tensor and rank() != source:
        tensor.copy_(carrier)


class _Pickler(pickle.Pickler):
    """Pickles everything but tensors, which it sets aside (sent on their own, by dist.broadcast)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self.tensors[pid]


def broadcast_value(value: Any, source: int) -> Any:
    """Process `source`'s `value` (any picklable value holding tensors: packed forms, masks) on every
    process; the others' `value` is ignored. The rest of the value is pickled and sent with
    broadcast_object_list, each tensor's bytes with dist.broadcast on the collective's device; a tensor
    arrives on the CPU if it left from there, else on this process's device."""
    me, device = rank(), _device()
    header: list[Any] = [None]
    tensors: list[torch.Tensor] = []
    if me == source:
        buffer = io.BytesIO()
        pickler = _Pickler(buffer)
        pickler.dump(value)
        tensors = pickler.tensors
        header = [(buffer.getvalue(), [(t.dtype, tuple(t.shape), t.device.type == "cpu") for t in tensors])]
    dist.broadcast_object_list(header, src=source)
    pickled, metas = header[0]
    if me == source:
        for tensor in tensors:
            if tensor.numel():
                dist.broadcast(tensor.detach().to(device).contiguous().reshape(-1).view(torch.uint8), source)
        return value
    received = []
    for dtype, shape, on_cpu in metas:
        carrier = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8, device=device)
        if carrier.numel():
            dist.broadcast(carrier, source)
        tensor = carrier.view(dtype).reshape(shape)
        received.append(tensor.cpu() if on_cpu else tensor)
    return _Unpickler(io.BytesIO(pickled), received).load()
