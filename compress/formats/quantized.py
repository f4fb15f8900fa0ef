"""A quantized target as stored: codes, per-group statistics (plain float16, integer, or themselves
quantized as SpQR's second level), a per-row lookup table instead (SqueezeLLM), outliers, the
sparsity mask and a column permutation; `dequantize` gives the weights the model computes with, by
the same expression the methods used, so the packed form rebuilds them bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats.outliers import Outliers

SMALLEST_SCALE = 2.0**-24  # the smallest positive float16: a scale never rounds to zero


@dataclass
class QuantizedStatistic:
    """A statistic (scales or zero points, [out, groups]) quantized in groups of `group_size` along
    the output dimension, as SpQR stores its second-level statistics: value = low + step * code with
    float16 `step` and `low` per group. (SpQR writes the same grid as step * (code - zero); storing the
    grid's low end instead of its zero point keeps float16 exact enough at any bit width.)"""

    codes: torch.Tensor  # int [out, groups]
    bits: int
    group_size: int
    step: torch.Tensor  # float16 [out // group_size, groups]
    low: torch.Tensor  # float16 [out // group_size, groups]

    def values(self) -> torch.Tensor:
        step = self.step.float().repeat_interleave(self.group_size, dim=0)
        low = self.low.float().repeat_interleave(self.group_size, dim=0)
        return low + step * self.codes.float()


@dataclass
class QuantizedWeight:
    """One target in the packed format (see the module docstring)."""

    shape: tuple[int, int]
    bits: int
    # input columns per group; equals the input size for one group per row (and with a lut). The last
    # group is shorter when it does not divide the input size: groups = ceil(in / group_size)
    group_size: int
    codes: torch.Tensor  # int [out, in]
    scale: torch.Tensor | QuantizedStatistic | None  # float16 [out, groups] or quantized; None with a lut
    zero: torch.Tensor | QuantizedStatistic | None  # float16, or integer-valued float32 (stored in `bits` bits), or quantized
    outliers: Outliers | None = None
    keep: torch.Tensor | None = None  # bool [out, in]: False where pruned (stored 1 bit a weight)
    perm: torch.Tensor | None = None  # int [in]: stored column k is column perm[k] of the weight
    lut: torch.Tensor | None = None  # float16 [out, 2^bits]: per-row table of values, used instead of scale and zero
    # every row holds only {min, 0, max} (QMoE): codes 0 = zero, 1 = min, 2 = max and lut[:, :3] = (0, min, max);
    # the export stores it dictionary-coded (compress/formats/ternary_dict.py)
    ternary: bool = False

    def group_values(self, statistic: torch.Tensor | QuantizedStatistic) -> torch.Tensor:
        """A group's statistic for each of its columns, [out, in] (a last, shorter group is cut to fit)."""
        values = statistic.values() if isinstance(statistic, QuantizedStatistic) else statistic.float()
        return values.repeat_interleave(self.group_size, dim=1)[:, : self.shape[1]]

    def to(self, device: torch.device | str) -> QuantizedWeight:
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, (QuantizedStatistic, Outliers)):
                return type(value)(**{k: move(v) for k, v in vars(value).items()})
            return value

        return QuantizedWeight(**{k: move(v) for k, v in vars(self).items()})

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] weights the model computes with."""
        if self.lut is not None:
            weight = self.lut.float().gather(1, self.codes.long())
        else:
            weight = self.group_values(self.scale) * (self.codes.float() - self.group_values(self.zero))
        if self.outliers is not None and self.outliers.count:
            rows, cols = self.outliers.positions()
            weight[rows, cols] = self.outliers.values.float()
        if self.keep is not None:
            weight = torch.where(self.keep, weight, torch.zeros_like(weight))
        if self.perm is not None:
            restored = torch.empty_like(weight)
            restored[:, self.perm.long()] = weight
            weight = restored
        return weight
