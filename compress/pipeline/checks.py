"""The checks `compress plan` makes besides resolving the stages (compress/pipeline/plan.py), each
failing with one CompressError line before any work: the checkpoint's files against the model's
skeleton (headers only, never the data), the texts against the windows the recipe asks for, the
sequence lengths against the model's context, and the plan's memory estimates against the machine."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.calibration.data import check_calibration_text
from compress.errors import CompressError
from compress.model.checkpoint import INDEX_FILE, read_header
from compress.pipeline.evaluate import eval_tokens
from compress.recipe import Recipe

if TYPE_CHECKING:
    from compress.pipeline.plan import StagePlan

MEMORY_CAP_VARIABLE = "COMPRESS_MAX_MEMORY_GB"  # the host memory a plan may use, in GB (2**30 bytes), instead of the machine's
_STANDARD_FLOATS = {"F16", "BF16", "F32", "F64"}  # cast into one another on load, as transformers does
_INTEGERS = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"}
_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.bool: "BOOL",
          torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def check_checkpoint(folder: Path, model: nn.Module) -> None:
    """Every safetensors file of the checkpoint is whole (its header read, its data never), and, when
    the files hold the model's own tensor names, every tensor the model needs is there with the shape
    and a dtype the skeleton takes. Files in another layout (transformers 5 renames and fuses some on
    load, e.g. Mixtral's per-expert w1/w2/w3 into experts.gate_up_proj) are not compared tensor by tensor."""
    index = folder / INDEX_FILE
    files = {file.name for file in folder.glob("*.safetensors")}
    where: dict[str, str] = {}
    if index.is_file():
        try:
            where = {str(k): str(v) for k, v in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CompressError(f"model index {index} is not a valid index (JSON with a weight_map)") from None
        missing = sorted(set(where.values()) - files)
        if missing:
            raise CompressError(f"model index {index} names {len(missing)} shard(s) that are not there: {', '.join(missing[:3])}")
    headers = {name: read_header(folder / name) for name in sorted(files)}
    if not index.is_file():
        where = {key: name for name, header in headers.items() for key in header}
    for key, name in where.items():
        if key not in headers[name]:
            raise CompressError(f"model index {index} puts {key} in {name}, which does not hold it")
    _compare(folder, model, where, headers)


def _compare(folder: Path, model: nn.Module, where: dict[str, str], headers: dict[str, dict]) -> None:
    state = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}  # a tied tensor's names
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    complete = all(any(name in where for name in names) for names in aliases.values())  # streamed by name (keys_match)
    if not where or not (complete or set(where) <= set(state)):
        return  # not the model's own names (or no safetensors): transformers maps them on load
    buffers = {name for name, _ in model.named_buffers()}
    ignored = [re.compile(pattern) for pattern in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    for names in aliases.values():
        present = [name for name in names if name in where]
        if not present:
            name = names[0]
            if name not in buffers and not any(pattern.search(name) for pattern in ignored):  # tied ones: one name is enough
                raise CompressError(f"model files in {folder} lack tensor {name} that the model's config.json needs")
            continue
        expected = state[names[0]]
        for name in present:
            info = headers[where[name]][name]
            found, shape = str(info["dtype"]), list(info["shape"])
            if shape != list(expected.shape):
                raise CompressError(f"model file {folder / where[name]}: tensor {name} has shape {shape}; the model's config.json "
                                    f"expects {list(expected.shape)}")
            floating = expected.dtype.is_floating_point
            if found != _NAMES.get(expected.dtype) and found not in (_STANDARD_FLOATS if floating else _INTEGERS):
                want = "a float (F16, BF16, F32 or F64)" if floating else f"an integer ({_NAMES.get(expected.dtype, expected.dtype)})"
                raise CompressError(f"model file {folder / where[name]}: tensor {name} is stored as {found}; the model expects {want}")


def check_texts(recipe: Recipe, config: object, tokenizer: object, calibrates: bool) -> None:
    """Windows no longer than the model's context (learned positions fail past it; rotary ones run on
    positions the model never saw), an evaluation text of at least one evaluate.seqlen window, and
    (when a stage calibrates) a calibration text with a calibration.seqlen window to draw."""
    context = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(getattr(config, key, None), int)), None)
    lengths = {"calibration.seqlen": recipe.calibration.seqlen if calibrates else 0, "evaluate.seqlen": recipe.evaluate.seqlen}
    for key, length in lengths.items():
        if context and length > context:
            raise CompressError(f"{key}={length} is longer than the model's context ({context} positions): lower it to {context} or less")
    eval_tokens(recipe, tokenizer)
    if calibrates:
        check_calibration_text(recipe.calibration, tokenizer)


# --- memory -------------------------------------------------------------------------------------


def human_size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def host_memory_limit() -> tuple[int, str]:
    """(bytes, what sets it): $COMPRESS_MAX_MEMORY_GB when set (GB of 2**30 bytes; also the way past
    a virtual machine whose MemTotal grows as memory is used), else the machine's memory (MemTotal,
    or a container's cgroup limit when lower); 0 when none can be read."""
    cap = os.environ.get(MEMORY_CAP_VARIABLE)
    if cap:
        try:
            gigabytes = float(cap)
        except ValueError:
            gigabytes = 0.0
        if not 0 < gigabytes < float("inf"):
            raise CompressError(f"${MEMORY_CAP_VARIABLE}={cap!r}: expected a positive number of GB")
        return int(gigabytes * 2**30), f"${MEMORY_CAP_VARIABLE}={cap}"
    limits = []
    try:
        text = Path("/proc/meminfo").read_text()
        limits.append((int(re.search(r"^MemTotal:\s+(\d+) kB", text, re.M).group(1)) * 1024, "this machine's memory"))
    except (OSError, AttributeError, ValueError):
        try:
            limits.append((os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's memory"))
        except (OSError, ValueError, AttributeError):
            pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limits.append((int(Path(path).read_text().strip()), "this container's memory limit"))
        except (OSError, ValueError):
            pass
    return min(limits, default=(0, ""))


def device_memory_limit(device: torch.device) -> tuple[int, str]:
    if device.type != "cuda":
        return 0, ""
    properties = torch.cuda.get_device_properties(device)
    return int(properties.total_memory), f"the memory of {properties.name}"


def check_memory(recipe: Recipe, stages: Sequence[StagePlan], device: torch.device, compute_dtype: torch.dtype) -> None:
    """Refuse a plan whose peak memory estimate exceeds what the machine has, naming what to lower."""
    host, device_limit = host_memory_limit(), device_memory_limit(device)
    for stage in stages:
        for where, peak, (limit, source) in (("host", stage.peak_host_bytes, host), ("GPU", stage.peak_device_bytes, device_limit)):
            if not limit or peak <= limit:
                continue
            fixed = peak - stage.activation_bytes
            if stage.activation_bytes and fixed < limit:
                most = int(recipe.calibration.nsamples * (limit - fixed) / stage.activation_bytes)
                advice = (f"lower calibration.nsamples={recipe.calibration.nsamples} to at most {most} (or calibration.seqlen)" if most
                          else f"lower calibration.seqlen={recipe.calibration.seqlen} (and calibration.nsamples)")
            elif where == "host" and compute_dtype == torch.float32 and recipe.model.dtype == "auto":
                advice = "the model itself does not fit: use a machine with more memory, or set model.dtype=bfloat16"
            else:
                advice = "the model itself does not fit: use a machine with more memory" + (", or model.device=cpu" if where == "GPU" else "")
            raise CompressError(f"stage {stage.index} ({stage.method}) needs ~{human_size(peak)} of {where} memory (the plan's estimate), "
                                f"more than {source} ({human_size(limit)}); {advice}")
