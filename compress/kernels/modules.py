"""Kernel-backed Linear modules, one per packed format: each holds only its format's packed tensors (as
registered buffers, so state_dict and .to(device) carry them) and an optional bias, is built from the
packed dataclass (`from_packed`), and computes y = x @ W.T + b for x [..., in] without materialising W:
the CPU kernels (cpu.py) on a CPU, dispatch.py's choice (Triton on CUDA, else the reference) elsewhere."""

from __future__ import annotations

import dataclasses

import torch

from compress.formats import bitmap, group_quant, lut, nm, sparse_quant, spqr, ternary_dict
from compress.kernels.cpu import Packed, packed_matmul, ternary_dict_matmul


class PackedLinear(torch.nn.Module):
    """The shared part: buffers named after the dataclass's tensor fields, the rest kept as plain
    attributes; `.packed` rebuilds the dataclass around the current buffers."""

    packed_type: type = type(None)

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(packed, self.packed_type):
            raise TypeError(f"{type(self).__name__} takes a {self.packed_type.__name__}, got {type(packed).__name__}")
        self.out_features, self.in_features = packed.shape
        self._tensor_fields: list[str] = []
        self._settings: dict = {}
        for field in dataclasses.fields(packed):
            value = getattr(packed, field.name)
            if isinstance(value, torch.Tensor) or (value is None and field.name not in ("shape",)):
                self._tensor_fields.append(field.name)
                self.register_buffer(field.name, value)
            else:
                self._settings[field.name] = value
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_packed(cls, packed: Packed, bias: torch.Tensor | None = None) -> PackedLinear:
        return cls(packed, bias)

    @property
    def packed(self) -> Packed:
        return self.packed_type(**self._settings, **{name: getattr(self, name) for name in self._tensor_fields})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_matmul(x, self.packed)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):
        """A device move applies to the packed tensors; a dtype cast does not (the stored dtypes are part
        of the format: bf16/fp16 values, fp16 scales). The bias follows both."""
        before = {name: getattr(self, name) for name in self._tensor_fields if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            if getattr(self, name).dtype != old.dtype:
                setattr(self, name, old.to(getattr(self, name).device))
        return self

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self._settings.items() if k != "shape")
        return f"in_features={self.in_features}, out_features={self.out_features}, {settings}, bias={self.bias is not None}"


class NMLinear(PackedLinear):
    """N:M sparse values (bf16/fp16) and their in-group indices (compress.formats.nm)."""

    packed_type = nm.NMWeight


class GroupQuantLinear(PackedLinear):
    """int2/3/4/8 codes with per-group fp16 scales and zero points (compress.formats.group_quant)."""

    packed_type = group_quant.GroupQuantWeight


class BitmapLinear(PackedLinear):
    """Unstructured sparse: row bitmasks, packed values and tile offsets (compress.formats.bitmap)."""

    packed_type = bitmap.BitmapWeight


class SparseQuantLinear(PackedLinear):
    """N:M or bitmask positions with group-quantized kept weights (compress.formats.sparse_quant)."""

    packed_type = sparse_quant.SparseQuantWeight


class SpQRLinear(PackedLinear):
    """SpQR: group-quantized codes with (optionally second-level quantized) statistics, outliers, keep mask
    and column permutation (compress.formats.spqr)."""

    packed_type = spqr.SpQRWeight


class LUTLinear(PackedLinear):
    """SqueezeLLM: codes into per-row float16 tables, outliers, keep mask and permutation (compress.formats.lut)."""

    packed_type = lut.LUTWeight


class TernaryDictLinear(PackedLinear):
    """QMoE's dictionary-coded ternary weights (compress.formats.ternary_dict): codes, row offsets, minmax and the
    adaptive dictionary's symbol counts as buffers. The dictionary's kernel table (int32 [codewords, 3], 768 KiB
    at 2^16) is not stored: the format rebuilds it (dictionary_of), and it is kept here as a non-persistent
    buffer, so .to(device) moves it with the codes and no call rebuilds or copies it. A module built on the meta
    device (transformers' loading) or given new tensors by load_state_dict builds it at its next call."""

    packed_type = ternary_dict.TernaryDictWeight

    def __init__(self, packed: ternary_dict.TernaryDictWeight, bias: torch.Tensor | None = None):
        super().__init__(packed, bias)
        self.register_buffer("kernel_table", None if self.codes.is_meta else self._table(), persistent=False)
        self.register_load_state_dict_post_hook(TernaryDictLinear._after_load)

    def _table(self) -> torch.Tensor:
        return ternary_dict.dictionary_of(self.packed).kernel_table.to(self.codes.device)

    @staticmethod
    def _after_load(module: TernaryDictLinear, incompatible_keys) -> None:  # a function, not a lambda: torch.save(module) pickles it
        module.kernel_table = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_table is None or self.kernel_table.device != self.codes.device:
            self.kernel_table = self._table()
        y = ternary_dict_matmul(x, self.packed, table=self.kernel_table)
        return y if self.bias is None else y + self.bias.to(y.dtype)


MODULES: dict[type, type[PackedLinear]] = {cls.packed_type: cls for cls in (NMLinear, GroupQuantLinear, BitmapLinear, SparseQuantLinear,
                                                                             SpQRLinear, LUTLinear, TernaryDictLinear)}


def from_packed(packed: Packed, bias: torch.Tensor | None = None) -> PackedLinear:
    """The module for a packed weight of any of the formats."""
    try:
        return MODULES[type(packed)](packed, bias)
    except KeyError:
        raise TypeError(f"no kernel-backed module for {type(packed).__name__}") from None
