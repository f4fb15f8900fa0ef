"""Ternary weights coded with a dictionary, below 1 bit a weight (QMoE, Frantar & Alistarh 2023): every
row r holds only the values {0, min_r, max_r}; weight symbols 0 = zero, 1 = min, 2 = max, paired as
s = t[2i] + 3 * t[2i + 1] (an odd width pads the last pair with a 0), and each row's pair sequence coded
on its own with a 2^16-codeword Tunstall dictionary (runs of 1..14 pairs) by greedy longest match:
tunstall.py defines the dictionary, the coder and the kernel table.

Tensors (prefix P):
  P.codes          int16 [code_count]: the 16-bit codewords (uint16 values stored as int16), row after
                   row; a row's codes cover exactly 2 * ceil(in / 2) weights
  P.row_offsets    int32 [out + 1]: row r's codes are codes[row_offsets[r] : row_offsets[r + 1]]
  P.minmax         float16 [out, 2]: column 0 = row r's value of symbol 1 (min), column 1 = of symbol 2 (max)
  P.symbol_counts  int64 [9], with dictionary "adaptive" only: how often each pair symbol occurs in the
                   whole weight (padding pairs included)
meta: {"format": "ternary_dict", "shape": [out, in], "dictionary": "adaptive" or "static", "codewords":
65536, "max_pairs": 14, "code_count": code_count}.
The dictionary is not stored: "static" is the reference's (P(zero) = 0.885, P(min) = P(max) = 0.0575);
"adaptive" is rebuilt at load time from tunstall.pair_probabilities(symbol_counts) (deterministic float64).
A kernel reads codeword c's (min_mask, max_mask, length) from the dictionary's int32 kernel_table [65536, 3]
and computes y[r] = min_r * sum(x at row r's min positions) + max_r * sum(x at its max positions), as
`reference_matmul` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats import tunstall
from compress.formats.quantized import QuantizedWeight
from compress.formats.words import check_tensor, exact_cast, tensor_bytes

FORMAT = "ternary_dict"
CODEWORDS = 65536
MAX_PAIRS = 14
DICTIONARIES = ("adaptive", "static")
MATMUL_ROWS = 256  # rows decoded at a time by reference_matmul


@dataclass
class TernaryDictWeight:
    shape: tuple[int, int]  # (out, in)
    codes: torch.Tensor  # int16 [code_count]
    row_offsets: torch.Tensor  # int32 [out + 1]
    minmax: torch.Tensor  # float16 [out, 2]
    symbol_counts: torch.Tensor | None  # int64 [9] ("adaptive"), None ("static")
    dictionary: str = "adaptive"
    codewords: int = CODEWORDS
    max_pairs: int = MAX_PAIRS

    @property
    def meta(self) -> dict:
        return {"format": FORMAT, "shape": list(self.shape), "dictionary": self.dictionary, "codewords": self.codewords,
                "max_pairs": self.max_pairs, "code_count": self.codes.numel()}


def _check_dictionary(dictionary: str) -> None:
    if dictionary not in DICTIONARIES:
        raise ValueError(f"dictionary {dictionary!r} unknown; choose one of {DICTIONARIES}")


def make_dictionary(kind: str, symbol_counts: torch.Tensor | None, codewords: int = CODEWORDS, max_pairs: int = MAX_PAIRS) -> tunstall.Dictionary:
    """The static dictionary, or the adaptive one of these pair-symbol counts (both cached)."""
    _check_dictionary(kind)
    if kind == "static":
        return tunstall.static_dictionary(codewords, max_pairs)
    return tunstall.build_dictionary(tunstall.pair_probabilities(symbol_counts), codewords, max_pairs)


def dictionary_of(packed: TernaryDictWeight) -> tunstall.Dictionary:
    """The dictionary the weight's codes index (built once per probability tuple, then cached)."""
    return make_dictionary(packed.dictionary, packed.symbol_counts, packed.codewords, packed.max_pairs)


def from_ternary(symbols: torch.Tensor, minmax: torch.Tensor, dictionary: str = "adaptive") -> TernaryDictWeight:
    """Weight symbols [out, in] in {0, 1, 2} (0 = zero, 1 = min, 2 = max) and float16 minmax [out, 2]."""
    _check_dictionary(dictionary)
    if symbols.dim() != 2 or symbols.is_floating_point() or symbols.dtype == torch.bool:
        raise ValueError(f"symbols must be integers [out, in], got {symbols.dtype} {tuple(symbols.shape)}")
    rows, cols = symbols.shape
    if tuple(minmax.shape) != (rows, 2):
        raise ValueError(f"minmax {tuple(minmax.shape)} must be [out, 2] = {(rows, 2)}")
    wrong = ((symbols < 0) | (symbols > 2)).nonzero()
    if wrong.numel():
        raise ValueError(f"symbol {wrong[0].tolist()} is {int(symbols[tuple(wrong[0])])}, not in {{0, 1, 2}}")
    minmax = exact_cast(minmax.float(), torch.float16, "minmax").cpu()
    pairs = tunstall.to_pairs(symbols.cpu())
    counts = torch.bincount(pairs.reshape(-1).to(torch.int64), minlength=tunstall.PAIR_SYMBOLS) if dictionary == "adaptive" else None
    codes, row_offsets = tunstall.encode(pairs, make_dictionary(dictionary, counts))
    return TernaryDictWeight((rows, cols), codes, row_offsets, minmax, counts, dictionary)


def from_quantized(q: QuantizedWeight, dictionary: str = "adaptive") -> TernaryDictWeight:
    """A ternary QuantizedWeight: bits 2, a per-row lut [out, 4] whose column 0 is 0 (columns 1 and 2 the
    row's min and max; column 3 unused), codes in {0, 1, 2}, no keep mask, outliers or permutation."""
    unsupported = [name for name, present in (("a keep mask", q.keep is not None), ("outliers", q.outliers is not None and q.outliers.count),
                                              ("a column permutation", q.perm is not None)) if present]
    if unsupported:
        raise ValueError(f"the ternary_dict format stores no {', '.join(unsupported)}")
    if q.lut is None or q.bits != 2:
        raise ValueError(f"the ternary_dict format needs a 2-bit per-row lut (ternary), got bits {q.bits} and "
                         f"{'a uniform grid' if q.lut is None else 'a lut'}")
    rows, cols = q.shape
    if tuple(q.lut.shape) != (rows, 4):
        raise ValueError(f"lut {tuple(q.lut.shape)} must be [out, 4] = {(rows, 4)}")
    if (q.lut[:, 0] != 0).any():
        raise ValueError(f"lut column 0 (the zero symbol) must be 0; row {int((q.lut[:, 0] != 0).nonzero()[0])} is not")
    return from_ternary(q.codes, q.lut[:, 1:3], dictionary)


def symbols_of(packed: TernaryDictWeight) -> torch.Tensor:
    """int8 [out, in] weight symbols (0 zero, 1 min, 2 max)."""
    return tunstall.decode(packed.codes, packed.row_offsets, packed.shape[1], dictionary_of(packed))


def unpack(packed: TernaryDictWeight) -> torch.Tensor:
    table = torch.cat([torch.zeros_like(packed.minmax[:, :1]), packed.minmax], 1).float()
    return table.gather(1, symbols_of(packed).to(table.device, torch.int64))


def to_tensors(packed: TernaryDictWeight, prefix: str) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.codes": packed.codes, f"{prefix}.row_offsets": packed.row_offsets, f"{prefix}.minmax": packed.minmax}
    if packed.symbol_counts is not None:
        tensors[f"{prefix}.symbol_counts"] = packed.symbol_counts
    return tensors


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> TernaryDictWeight:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{prefix}: format {meta.get('format')!r}, expected {FORMAT!r}")
    (rows, cols), kind = meta["shape"], meta["dictionary"]
    if kind not in DICTIONARIES:
        raise ValueError(f"{prefix}: dictionary {kind!r} unknown; this version reads {DICTIONARIES}")
    codewords, max_pairs = meta.get("codewords", CODEWORDS), meta.get("max_pairs", MAX_PAIRS)
    if not 9 <= codewords <= CODEWORDS or not 1 <= max_pairs <= MAX_PAIRS:
        raise ValueError(f"{prefix}: {codewords} codewords of at most {max_pairs} pairs not supported (16-bit codes, 28 weights)")
    codes = check_tensor(tensors, f"{prefix}.codes", (torch.int16,), None if "code_count" not in meta else (meta["code_count"],))
    if codes.dim() != 1:
        raise ValueError(f"{prefix}.codes: shape {tuple(codes.shape)}, expected one dimension")
    row_offsets = check_tensor(tensors, f"{prefix}.row_offsets", (torch.int32,), (rows + 1,))
    minmax = check_tensor(tensors, f"{prefix}.minmax", (torch.float16,), (rows, 2))
    counts = None
    if kind == "adaptive":
        counts = check_tensor(tensors, f"{prefix}.symbol_counts", (torch.int64,), (tunstall.PAIR_SYMBOLS,))
    elif f"{prefix}.symbol_counts" in tensors:
        raise ValueError(f"{prefix}.symbol_counts: present, but the static dictionary stores no counts")
    if not row_offsets.is_meta and not codes.is_meta:
        ends = row_offsets.to(torch.int64)
        if (int(ends[0]) != 0 or int(ends[-1]) != codes.numel() or (ends.diff() < 0).any()):
            raise ValueError(f"{prefix}.row_offsets: must rise from 0 to the {codes.numel()} codes")
    if counts is not None and not counts.is_meta and (counts < 0).any():
        raise ValueError(f"{prefix}.symbol_counts: negative count")
    return TernaryDictWeight((rows, cols), codes, row_offsets, minmax, counts, kind, codewords, max_pairs)


def nbytes(packed: TernaryDictWeight) -> int:
    return tensor_bytes(to_tensors(packed, ""))


def expert_bits(packed: TernaryDictWeight) -> dict[str, float]:
    """Bits per parameter of each stored tensor, of the codes alone ("codes") and of everything ("total")."""
    params = max(1, packed.shape[0] * packed.shape[1])
    bits = {name.lstrip("."): 8 * tensor_bytes({name: t}) / params for name, t in to_tensors(packed, "").items()}
    return bits | {"total": 8 * nbytes(packed) / params}


def codeword_nonzeros(kernel_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each codeword's nonzero weights in column order, the form the GPU kernels lay their dictionaries out from:
    (positions int64 [codewords, 32]: the nonzero lanes first, then the rest; is_max int64 [codewords, 32] at those
    positions; count int64 [codewords]: how many are nonzero)."""
    table = kernel_table.to(torch.int64)
    lanes = torch.arange(32)
    nonzero = (((table[:, 0:1] | table[:, 1:2]) >> lanes) & 1).bool()
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)
    return order, (table[:, 1:2] >> order) & 1, nonzero.sum(1)


def reference_matmul(x: torch.Tensor, packed: TernaryDictWeight) -> torch.Tensor:
    """x @ W.T, MATMUL_ROWS rows at a time: decode the rows' codes to symbols, then
    y[r] = min_r * sum(x at min positions) + max_r * sum(x at max positions) (fp32 accumulation, x's dtype out)."""
    rows, cols = packed.shape
    xf = x.reshape(-1, cols).float()
    out = torch.empty(xf.shape[0], rows, dtype=torch.float32, device=x.device)
    dictionary, offsets = dictionary_of(packed), packed.row_offsets.to(torch.int64)
    minmax = packed.minmax.float().to(x.device)
    for r in range(0, rows, MATMUL_ROWS):
        end = min(r + MATMUL_ROWS, rows)
        codes = packed.codes[int(offsets[r]) : int(offsets[end])]
        symbols = tunstall.decode(codes, offsets[r : end + 1] - offsets[r], cols, dictionary).to(x.device)
        at_min = xf @ (symbols == 1).float().T
        at_max = xf @ (symbols == 2).float().T
        out[:, r:end] = at_min * minmax[r:end, 0] + at_max * minmax[r:end, 1]
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)
