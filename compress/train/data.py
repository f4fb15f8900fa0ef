"""Training data: the whole text cut into fixed-length sequences, read in a seeded order that is
reshuffled every epoch. Batch k is a pure function of (seed, k), so a resumed run needs only the step
it stopped at to read exactly the batches an uninterrupted one would have."""

from __future__ import annotations

import torch

from compress.errors import CompressError


class PackedSequences:
    def __init__(self, ids: torch.Tensor, seqlen: int, seed: int, source: str = "text") -> None:
        count = ids.numel() // seqlen
        if count < 1:
            raise CompressError(f"training text ({source}) has {ids.numel()} tokens; a sequence of seqlen={seqlen} needs more")
        self.sequences = ids[: count * seqlen].view(count, seqlen)
        self.seed = seed
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # our own: the caller's RNG is untouched
            self._orders = {epoch: torch.randperm(len(self), generator=generator)}
        return self._orders[epoch]

    def batch(self, index: int, size: int) -> torch.Tensor:
        """The `index`-th batch of `size` sequences ([size, seqlen] token ids)."""
        rows = []
        for position in range(index * size, (index + 1) * size):
            epoch, offset = divmod(position, len(self))
            rows.append(int(self._order(epoch)[offset]))
        return self.sequences[rows]

    def epochs(self, batches: int, size: int) -> float:
        return batches * size / len(self)
