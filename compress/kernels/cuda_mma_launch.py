"""How a call of the tensor-core group-quant kernel (cuda_mma.py) is laid out: `Launch`, and its name in the kernel's."""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a call is laid out: row tiles a block, warps a block (splitting the columns), stages of each warp's code
    pipeline (each unit's codes loaded stages - 1 units ahead), whether the activations come with the codes (else just
    before use), and whether the pipeline is a ring of registers or, `async_copy`, of shared memory filled by cp.async
    (activations then one unit ahead in registers)."""

    row_tiles: int = 2
    warps: int = 4
    stages: int = 2
    x_ahead: bool = True
    async_copy: bool = False
    slices: int = 1  # blocks a row-tile group's columns are split over (their fp32 sums added by the last to finish)
    prefetch: int = 0  # units ahead whose codes a warp prefetches into L2 (one bulk prefetch a row tile; 0: none)

    def __str__(self) -> str:
        return self.form() + (str(self.slices) if self.slices > 1 else "")

    def form(self) -> str:
        """What the compiled kernel depends on (the slice count is the grid's y size, not compiled in)."""
        flags = (("a" if self.x_ahead else "u") + ("c" if self.async_copy else "") + (f"f{self.prefetch}" if self.prefetch else "")
                 + ("k" if self.slices > 1 else ""))
        return f"r{self.row_tiles}w{self.warps}s{self.stages}{flags}"

    @classmethod
    def parse(cls, name: str) -> Launch:
        """The launch `str` names, e.g. r2w4s2a, r2w4s4ac, r2w2s2ak2, r2w4s2af4."""
        match = re.fullmatch(r"r(\d+)w(\d+)s(\d+)([au])(c?)(?:f(\d+))?(?:k(\d+))?", name)
        if not match:
            raise ValueError(f"not a launch name: {name!r} (r<row tiles>w<warps>s<stages><a|u>[c][f<prefetch>][k<slices>])")
        row_tiles, warps, stages, ahead, async_copy, prefetch, slices = match.groups()
        return cls(int(row_tiles), int(warps), int(stages), ahead == "a", async_copy == "c", int(slices or 1), int(prefetch or 0))

    def check(self, tiles: int, units: int | None = None) -> None:
        if tiles % self.row_tiles or self.warps not in (1, 2, 4, 8, 16) or not 1 <= self.stages <= 4:
            raise ValueError(f"{self}: row tiles must divide the weight's {tiles} tiles, 1-16 warps (a power of two), 1-4 stages")
        if self.async_copy and (self.stages < 2 or not self.x_ahead):
            raise ValueError(f"{self}: the cp.async pipeline takes 2-4 stages with the activations ahead")
        if not 1 <= self.slices <= 16 or (units is not None and self.slices > max(1, units)):
            raise ValueError(f"{self}: 1-16 slices, at most one a 128-column unit ({units} units)")
        if not 0 <= self.prefetch <= 8 or (self.prefetch and self.async_copy):
            raise ValueError(f"{self}: an L2 prefetch 0-8 units ahead, on the register ring")

    def shared_bytes(self, bits: int) -> int:
        """Dynamic shared memory: the cp.async rings (a stage: the row tiles' code chunks and statistics a lane)."""
        return self.warps * self.stages * self.row_tiles * (bits // 2 * 512 + 256) if self.async_copy else 0
