"""Variable-to-fixed (Tunstall) dictionaries over pairs of ternary weights, as QMoE codes them
(Frantar & Alistarh 2023), and the greedy coder that uses them.

Symbols: a weight is 0 (zero), 1 (the row's min) or 2 (the row's max); weights 2i and 2i + 1 of a row
form the pair symbol s = t[2i] + 3 * t[2i + 1] in 0..8 (an odd width pads the last pair with a 0).

The dictionary of `count` codewords for pair probabilities p[0..8]: every sequence of 1..max_pairs pair
symbols has the probability p[s1] * p[s2] * ... multiplied left to right in float64. It holds the 9
single-symbol sequences (always: any row can be parsed whatever the statistics) and the most probable
longer sequences, ranked by (-probability, the sequence compared lexicographically as a tuple, a prefix
before its extensions), until `count` entries. Codeword c is the sequence of rank c in that order over
the chosen set. The set is prefix-closed: a prefix is at least as probable as its extension (every
factor is at most 1, and float64 rounding is monotone) and ranks before it on a tie.

Dictionary tensors:
  sequences     int8 [count, max_pairs]: codeword c's pair symbols, -1 past its end
  children      int32 [count + 1, 9]: the trie; row `count` is the root, children[n, s] is the codeword
                of node n's sequence followed by s, -1 when that is not a codeword
  kernel_table  int32 [count, 3] = (min_mask, max_mask, length): bit t of min_mask is set when weight t
                of the codeword's run is min (symbol 1), bit t of max_mask when it is max (symbol 2);
                length = the weights the codeword covers (2 x its pairs, at most 28)
  weight_symbols int8 [count, 2 * max_pairs]: the run's weight symbols, 0 past its end

A row is coded on its own by greedy longest match (walk the trie from the root while the child exists,
else emit the current node and restart at the root with the symbol), so it is a whole number of 16-bit
codes; `encode` returns the codes of all rows back to back and int32 row_offsets [rows + 1].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

PAIR_SYMBOLS = 9
STATIC_WEIGHT_PROBABILITIES = (0.885, 0.0575, 0.0575)  # P(zero), P(min), P(max): the reference's model
MAX_INT32 = 2**31 - 1


@dataclass(frozen=True)
class Dictionary:
    probabilities: tuple[float, ...]  # the 9 pair probabilities it was built from
    max_pairs: int
    sequences: torch.Tensor  # int8 [count, max_pairs], -1 past the end
    children: torch.Tensor  # int32 [count + 1, 9], row count = root, -1 = no child
    kernel_table: torch.Tensor  # int32 [count, 3]: (min_mask, max_mask, length in weights)
    weight_symbols: torch.Tensor  # int8 [count, 2 * max_pairs]

    @property
    def count(self) -> int:
        return self.sequences.shape[0]

    @property
    def root(self) -> int:
        return self.count

    def sequence(self, code: int) -> tuple[int, ...]:
        """Codeword `code`'s pair symbols."""
        return tuple(s for s in self.sequences[code].tolist() if s >= 0)


def pair_probabilities(counts: torch.Tensor | Sequence[int]) -> tuple[float, ...]:
    """The 9 pair-symbol probabilities from their counts, add-one smoothed (none is 0), float64."""
    counts = np.asarray(torch.as_tensor(counts).cpu(), dtype=np.float64).reshape(-1)
    if counts.shape != (PAIR_SYMBOLS,) or (counts < 0).any():
        raise ValueError(f"need 9 non-negative pair-symbol counts, got {counts.tolist()}")
    return tuple(float(v) for v in (counts + 1.0) / (counts.sum() + PAIR_SYMBOLS))


def static_pair_probabilities() -> tuple[float, ...]:
    w = STATIC_WEIGHT_PROBABILITIES
    return tuple(w[s % 3] * w[s // 3] for s in range(PAIR_SYMBOLS))


def static_dictionary(count: int = 65536, max_pairs: int = 14) -> Dictionary:
    """The reference's dictionary: P(zero) = 0.885, P(min) = P(max) = 0.0575, weights independent."""
    return build_dictionary(static_pair_probabilities(), count, max_pairs)


def _count_at_least(p: np.ndarray, threshold: float, max_pairs: int, cap: int) -> int:
    """Sequences of 2..max_pairs symbols with probability >= threshold (cap + 1 once above cap)."""
    level, total = p, 0
    for _ in range(max_pairs - 1):
        level = (level[:, None] * p[None, :]).reshape(-1)
        level = level[level >= threshold]
        total += level.size
        if total > cap:
            return cap + 1
        if not level.size:
            break
    return total


def _threshold(p: np.ndarray, target: int, max_pairs: int) -> float:
    """A probability T with at least `target` longer sequences >= T, and not too many more."""
    cap = 2 * target + 1024
    lo, hi = math.log(float(p.min())) * max_pairs - 1, math.log(float(p.max())) * 2  # below / at the top of every product
    for _ in range(200):
        mid = (lo + hi) / 2
        n = _count_at_least(p, math.exp(mid), max_pairs, cap)
        if target <= n <= cap:
            return math.exp(mid)
        lo, hi = (mid, hi) if n > cap else (lo, mid)
        if hi - lo < 1e-12:
            break
    return math.exp(lo)  # a tie cluster wider than the cap: enumerate all of it


@functools.lru_cache(maxsize=32)
def build_dictionary(pair_probabilities: tuple[float, ...], count: int = 65536, max_pairs: int = 14) -> Dictionary:
    """The Tunstall dictionary of the module docstring (deterministic; cached per probability tuple)."""
    p = np.asarray(pair_probabilities, dtype=np.float64)
    if p.shape != (PAIR_SYMBOLS,) or not (p > 0).all() or p.sum() > 1 + 1e-9:
        raise ValueError(f"need 9 positive pair probabilities summing to at most 1, got {list(pair_probabilities)}")
    if not 1 <= max_pairs <= 14:
        raise ValueError(f"max_pairs {max_pairs} must be 1..14 (a codeword covers at most 28 weights)")
    if not PAIR_SYMBOLS <= count <= 65536 or count > sum(PAIR_SYMBOLS**k for k in range(1, max_pairs + 1)):
        raise ValueError(f"count {count} must be 9..65536 and at most the sequences of 1..{max_pairs} pairs")
    target = count - PAIR_SYMBOLS
    threshold = _threshold(p, target, max_pairs) if target else math.inf
    # enumerate level by level: the singles, then every extension at least as probable as the threshold
    digit = 10 ** np.arange(max_pairs - 1, -1, -1, dtype=np.int64)  # key: symbols + 1 as decimal digits
    symbols = np.arange(PAIR_SYMBOLS)
    probs, keys, parents, last = [p], [(symbols + 1) * digit[0]], [np.full(PAIR_SYMBOLS, -1)], [symbols]
    level_prob, level_key, start = p, keys[0], 0
    for depth in range(1, max_pairs):
        child = (level_prob[:, None] * p[None, :]).reshape(-1)
        index = np.flatnonzero(child >= threshold)
        if not index.size:
            break
        parent, symbol = np.divmod(index, PAIR_SYMBOLS)
        level_prob, level_key = child[index], level_key[parent] + (symbol + 1) * digit[depth]
        for store, value in ((probs, level_prob), (keys, level_key), (parents, parent + start), (last, symbol)):
            store.append(value)
        start += len(probs[-2])
    prob, key, parent, symbol = (np.concatenate(a) for a in (probs, keys, parents, last))
    longer = np.arange(PAIR_SYMBOLS, len(prob))
    longer = longer[np.lexsort((key[longer], -prob[longer]))[:target]]
    chosen = np.concatenate([np.arange(PAIR_SYMBOLS), longer])
    chosen = chosen[np.lexsort((key[chosen], -prob[chosen]))]  # codeword c = chosen[c]
    code_of = np.full(len(prob), -1, dtype=np.int64)
    code_of[chosen] = np.arange(count)
    children = np.full((count + 1, PAIR_SYMBOLS), -1, dtype=np.int32)
    parent_code = np.where(parent[chosen] < 0, count, code_of[np.maximum(parent[chosen], 0)])
    assert (parent_code >= 0).all(), "the dictionary is prefix-closed"
    children[parent_code, symbol[chosen]] = np.arange(count)
    sequences = (key[chosen][:, None] // digit[None, :]) % 10 - 1
    return Dictionary(tuple(float(v) for v in p), max_pairs, torch.from_numpy(sequences.astype(np.int8)),
                      torch.from_numpy(children), *_tables(sequences))


def _tables(sequences: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel_table int32 [count, 3], weight_symbols int8 [count, 2 * max_pairs]) of the sequences."""
    count, max_pairs = sequences.shape
    valid = sequences >= 0
    weights = np.zeros((count, 2 * max_pairs), dtype=np.int64)
    weights[:, 0::2], weights[:, 1::2] = np.where(valid, sequences % 3, 0), np.where(valid, sequences // 3, 0)
    bit = np.int64(1) << np.arange(2 * max_pairs, dtype=np.int64)
    table = np.stack([((weights == 1) * bit).sum(1), ((weights == 2) * bit).sum(1), 2 * valid.sum(1)], axis=1)
    return torch.from_numpy(table.astype(np.int32)), torch.from_numpy(weights.astype(np.int8))


def to_pairs(symbols: torch.Tensor) -> torch.Tensor:
    """Weight symbols [rows, width] in {0, 1, 2} -> pair symbols uint8 [rows, ceil(width / 2)] (encode takes
    any integer dtype)."""
    t = torch.nn.functional.pad(symbols.to(torch.uint8), (0, symbols.shape[1] % 2))
    return t[:, 0::2] + 3 * t[:, 1::2]


def encode(pair_symbols: torch.Tensor, dictionary: Dictionary) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy trie parse of every row -> (codes int16 [total] holding uint16 values, row_offsets int32
    [rows + 1]); all rows advance together one pair column at a time (numpy: small ops, little overhead)."""
    if pair_symbols.dim() != 2 or pair_symbols.is_floating_point():
        raise ValueError(f"pair symbols must be integers [rows, pairs], got {pair_symbols.dtype} {tuple(pair_symbols.shape)}")
    rows, pairs = pair_symbols.shape
    if pair_symbols.numel() and (int(pair_symbols.min()) < 0 or int(pair_symbols.max()) >= PAIR_SYMBOLS):
        raise ValueError(f"pair symbols must be in 0..8, got [{int(pair_symbols.min())}, {int(pair_symbols.max())}]")
    if not pairs or not rows:
        return torch.zeros(0, dtype=torch.int16), torch.zeros(rows + 1, dtype=torch.int32)
    columns = pair_symbols.cpu().to(torch.uint8).T.contiguous().numpy()  # [pairs, rows]
    children = dictionary.children.numpy().reshape(-1)
    singles = children[dictionary.root * PAIR_SYMBOLS :]
    emitted = np.empty((pairs, rows), dtype=np.int32)  # emitted[j]: the code a row ends after pair j, else -1
    state, index, nxt, end = singles[columns[0]], np.empty(rows, np.int64), np.empty(rows, np.int32), np.empty(rows, bool)
    for j in range(1, pairs):
        symbol = columns[j]
        np.multiply(state, PAIR_SYMBOLS, out=index)
        index += symbol
        np.take(children, index, out=nxt)
        np.less(nxt, 0, out=end)
        emitted[j - 1] = -1
        np.copyto(emitted[j - 1], state, where=end)
        state = np.where(end, singles[symbol], nxt)
    emitted[pairs - 1] = state
    ends = emitted.T >= 0
    per_row = ends.sum(1, dtype=np.int64)
    if int(per_row.sum()) > MAX_INT32:
        raise ValueError(f"{int(per_row.sum())} codes overflow the int32 row offsets; split the matrix")
    codes = emitted.T[ends]
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(per_row, out=offsets[1:])
    return torch.from_numpy(codes.astype(np.uint16).view(np.int16)), torch.from_numpy(offsets.astype(np.int32))


def decode(codes: torch.Tensor, row_offsets: torch.Tensor, width: int, dictionary: Dictionary) -> torch.Tensor:
    """Weight symbols int8 [rows, width] of coded rows (the padding weight of an odd width dropped)."""
    rows, covered = row_offsets.numel() - 1, 2 * (-(-width // 2))
    offsets = row_offsets.to(torch.int64)
    if codes.dim() != 1 or rows < 0 or int(offsets[0]) != 0 or int(offsets[-1]) != codes.numel():
        raise ValueError(f"need codes [total] and row_offsets [rows + 1] rising from 0 to total, got {tuple(codes.shape)} "
                         f"and {row_offsets.tolist()[:3]}...{row_offsets.tolist()[-2:]}")
    chunk = max(1, (1 << 22) // max(covered, 1))  # rows decoded at once: temporaries stay bounded
    out = torch.empty(rows, width, dtype=torch.int8, device=codes.device)
    for r in range(0, rows, chunk):
        bounds = offsets[r : min(r + chunk, rows) + 1]
        out[r : r + len(bounds) - 1] = _decode_rows(codes[int(bounds[0]) : int(bounds[-1])], bounds - bounds[0], covered, dictionary)[:, :width]
    return out


def _decode_rows(codes: torch.Tensor, offsets: torch.Tensor, covered: int, dictionary: Dictionary) -> torch.Tensor:
    rows, device = offsets.numel() - 1, codes.device
    index = codes.to(torch.int64) & 0xFFFF
    if index.numel() != int(offsets[-1]) or (offsets.diff() < 0).any():
        raise ValueError(f"row_offsets must rise from 0 to the {codes.numel()} codes")
    if index.numel() and int(index.max()) >= dictionary.count:
        raise ValueError(f"code {int(index.max())} is outside the dictionary of {dictionary.count}")
    lengths = dictionary.kernel_table[:, 2].to(device, torch.int64)[index]
    ends = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])[offsets.to(device)]
    if (ends.diff() != covered).any():
        raise ValueError(f"a row's codes do not cover exactly {covered} weights")
    runs = dictionary.weight_symbols.to(device)[index]
    return runs[torch.arange(runs.shape[1], device=device) < lengths[:, None]].reshape(rows, covered)
