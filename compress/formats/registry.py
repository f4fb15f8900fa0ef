"""The kernel-ready formats by name (the "format" entry of each weight's `meta`), and what a reader needs
to rebuild one from stored tensors without knowing which format it is: `tensor_specs` (each tensor's
dtype and shape, written beside the weights so a loader can allocate them before reading) and
`from_tensors` (dispatch on meta["format"], every tensor checked)."""

from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

from compress.formats import bitmap, group_quant, lut, nm, sparse_quant, spqr, ternary_dict

FORMATS: dict[str, ModuleType] = {module.FORMAT: module for module in (nm, bitmap, group_quant, sparse_quant, spqr, lut, ternary_dict)}

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
               torch.int32: "int32", torch.int16: "int16", torch.uint8: "uint8", torch.int8: "int8", torch.bool: "bool"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def format_module(meta: dict) -> ModuleType:
    """The module of the format `meta` names (ValueError listing the known ones otherwise)."""
    name = meta.get("format")
    if name not in FORMATS:
        raise ValueError(f"unknown packed format {name!r}; this version reads {sorted(FORMATS)}")
    return FORMATS[name]


def tensor_fields(packed) -> dict[str, torch.Tensor]:
    """{field name: tensor} of a packed weight's dataclass (the tensors `to_tensors` writes)."""
    return {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed) if isinstance(getattr(packed, f.name), torch.Tensor)}


def tensor_specs(packed) -> dict[str, list]:
    """{field: [dtype name, shape]} of every stored tensor of a packed weight."""
    return {name: [DTYPE_NAMES[t.dtype], list(t.shape)] for name, t in tensor_fields(packed).items()}


def empty_tensors(prefix: str, specs: dict[str, list], device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
    """Uninitialised tensors `prefix.field` of the given specs (a loader fills them from the file)."""
    tensors = {}
    for name, (dtype, shape) in specs.items():
        if dtype not in DTYPES:
            raise ValueError(f"{prefix}.{name}: unknown dtype {dtype!r}")
        tensors[f"{prefix}.{name}"] = torch.empty(shape, dtype=DTYPES[dtype], device=device)
    return tensors


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict):
    """The packed weight of format meta["format"] from its stored tensors, each checked."""
    return format_module(meta).from_tensors(tensors, prefix, meta)


def unpack(packed) -> torch.Tensor:
    """The float32 [out, in] weight a packed weight holds."""
    return format_module(packed.meta).unpack(packed)


def nbytes(packed) -> int:
    return format_module(packed.meta).nbytes(packed)


def kept_mask(packed) -> torch.Tensor | None:
    """bool [out, in], True where the format keeps a weight (False: pruned), in the weight's own
    column order; None for a format without a sparsity mask (every weight stored)."""
    rows, cols = packed.shape
    if isinstance(packed, nm.NMWeight):
        columns = nm.kept_columns(packed.indices, packed.n, packed.m, cols)
        return torch.zeros(rows, cols, dtype=torch.bool, device=columns.device).scatter_(1, columns, True)
    if isinstance(packed, sparse_quant.SparseQuantWeight) and packed.indices is not None:
        n, m = sparse_quant.parse_pattern(packed.pattern)
        columns = nm.kept_columns(packed.indices, n, m, cols)
        return torch.zeros(rows, cols, dtype=torch.bool, device=columns.device).scatter_(1, columns, True)
    bitmask = getattr(packed, "bitmask", None)
    if bitmask is None:
        return None
    mask = bitmap.read_bitmask(bitmask, cols)
    perm = getattr(packed, "perm", None)
    if perm is not None:  # stored column k is column perm[k]
        restored = torch.empty_like(mask)
        restored[:, perm.to(torch.int64) & 0xFFFF] = mask
        mask = restored
    return mask
