"""Device views of packed weights: forms a GPU kernel reads faster than the stored one, built once per weight on
its device and kept while the weight's tensors live (a module's buffers), so every later call, e.g. one replayed
in a CUDA graph, only looks the view up.

`widen`: 3-bit group-quant codes (10 a 32-bit word) re-packed as 4-bit codes (8 a word), the form the split-K
GEMV and the 16-row dot tiles read (triton_splitk.py: a power of two codes a word, groups of whole words). The
view's code words are a third larger than the stored ones (4 bits a weight against 3.2), the result is the
same weight exactly (the same codes, scales and zero points).

`lut_codes`: a SqueezeLLM weight's codes in 4-bit words (8-bit above 4 bits) with each row's table as fp32
[rows, 2^word bits] (zero past the format's entries), for the split-K GEMV's table mode."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from compress.formats import group_quant
from compress.formats.words import pack_fields, read_fields

View = TypeVar("View")
_CACHE: dict[tuple[int, str], object] = {}


def cached(key: torch.Tensor, kind: str, build: Callable[[], View]) -> View:
    """The `kind` view keyed by one of the weight's tensors (its code words): built on the first call, then looked up
    while that tensor lives (a new tensor, e.g. after .to(device), gets a new view); the entry goes when the tensor
    goes. A view must not hold the key tensor object itself (it would keep it alive): one that shares its data holds
    an alias (`key.detach()`). Nothing is attached to the tensor, so torch.save / deepcopy of a module see no views."""
    entry = (id(key), kind)
    if entry not in _CACHE:
        _CACHE[entry] = build()
        weakref.finalize(key, _CACHE.pop, entry, None)
    return _CACHE[entry]


def widen(packed: group_quant.GroupQuantWeight) -> group_quant.GroupQuantWeight:
    """A 3-bit group-quant weight as the same weight with 4-bit code words (integer zero points re-packed alike)."""
    if packed.bits != 3:
        raise ValueError(f"widen takes 3-bit codes, got {packed.bits}-bit")
    codes = pack_fields(read_fields(packed.codes, 3, packed.shape[1]), 4)
    zero = pack_fields(read_fields(packed.zero, 3, packed.groups), 4) if packed.zero_kind == "integer" else packed.zero
    return group_quant.GroupQuantWeight(packed.shape, 4, packed.group_size, codes, packed.scale, zero, packed.zero_kind)


@dataclass
class LUTCodes:
    shape: tuple[int, int]  # (out, in)
    bits: int  # 4 or 8: the word's field width (the format's codes are 2-8 bits)
    codes: torch.Tensor  # int32 [out, words_for(in, bits)]
    table: torch.Tensor  # float32 [out, 2^bits]


def lut_codes(codes: torch.Tensor, table: torch.Tensor, shape: tuple[int, int], bits: int) -> LUTCodes:
    """A LUT weight's dense part (its `codes` words of `bits`-bit fields and float16 `table` [out, 2^bits])."""
    width = 4 if bits <= 4 else 8
    rows, cols = shape
    wide = codes.detach() if bits == width else pack_fields(read_fields(codes, bits, cols), width)  # the alias: see cached
    padded = torch.zeros(rows, 1 << width, dtype=torch.float32, device=table.device)
    padded[:, : table.shape[1]] = table.float()
    return LUTCodes(shape, width, wide, padded)


def kernel_form(packed):
    """What the Triton kernels should read for this weight: its widened view for 3-bit group-quant codes, else itself."""
    if isinstance(packed, group_quant.GroupQuantWeight) and packed.bits == 3:
        return cached(packed.codes, "widen", lambda: widen(packed))
    return packed
