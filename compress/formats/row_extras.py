"""What the spqr and lut formats share around their codes: the code stream (dense, or the kept weights'
codes only under a bitmask), the outliers in CSR and the column permutation; each format adds how a
code becomes a weight (a uniform grid per group, or a per-row table).

Tensors (prefix P):
  P.codes            dense: int32 [out, ceil(in / per_word)], row-aligned `bits`-bit fields (words.py;
                     per_word = 32 // bits: 10 for 3 bits, the top 2 bits zero). With a keep mask: the
                     codes of the kept weights only, int32 [code_words], exactly sparse_quant's
                     unstructured layout (every row starts at a word boundary, ceil(kept_r / per_word)
                     words a row)
  P.bitmask          keep mask only: int32 [out, ceil(in / 32)], exactly bitmap.py's
  P.code_offsets     keep mask only: int32 (int64 past 2^31) [ceil(out / tile_rows) + 1], the word of
                     P.codes where tile t starts (last entry: code_words), as sparse_quant
  P.outlier_row_ptr  int32 [out + 1]: row r's outliers are entries row_ptr[r] .. row_ptr[r + 1] - 1
  P.outlier_cols     int16 [nnz], read as unsigned: the stored column of each outlier, ascending in a row
  P.outlier_values   float16 [nnz]: the weight at that position (it replaces the dequantized weight; the
                     position keeps its code in P.codes)
  P.perm             int16 [in], read as unsigned: stored column k is column perm[k] of the weight, so
                     y = W_stored @ x[perm]; every tensor above is in stored (permuted) column order
The outlier tensors exist only when nnz > 0, P.perm only with a permutation. Outliers at pruned
positions are dropped when packing (the mask zeroes them anyway).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from compress.formats import bitmap, sparse_quant
from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedWeight
from compress.formats.words import check_tensor, exact_cast, pack_fields, read_fields, words_for

SUPPORTED_BITS = range(2, 9)
MAX_COLUMNS = 1 << 16  # 16-bit column indices (outliers, perm)
FIELDS = ("codes", "bitmask", "code_offsets", "outlier_row_ptr", "outlier_cols", "outlier_values", "perm")


def pack_extras(q: QuantizedWeight, tile_rows: int) -> dict[str, torch.Tensor | None]:
    """The shared fields (FIELDS) of a QuantizedWeight's codes, keep mask, outliers and permutation."""
    if q.bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be in 2..8, got {q.bits}")
    rows, cols = q.shape
    if cols > MAX_COLUMNS and (q.perm is not None or q.outliers is not None):
        raise ValueError(f"input size {cols} exceeds the 16-bit column indices of outliers and perm")
    codes = check_codes(q.codes, q.bits)
    if tuple(codes.shape) != (rows, cols):
        raise ValueError(f"codes {tuple(codes.shape)} must be [out, in] = {(rows, cols)}")
    fields: dict[str, torch.Tensor | None] = dict.fromkeys(FIELDS)
    keep = q.keep
    if keep is None:
        fields["codes"] = pack_fields(codes, q.bits)
    else:
        if keep.shape != (rows, cols) or keep.dtype != torch.bool:
            raise ValueError(f"keep must be bool [out, in], got {keep.dtype} {tuple(keep.shape)}")
        counts = keep.sum(1)
        fields["codes"] = sparse_quant.pack_rows(codes[keep], counts, q.bits)
        fields["bitmask"] = bitmap.pack_bitmask(keep)
        fields["code_offsets"] = bitmap.tile_offsets(sparse_quant._slots(counts, q.bits)[0], tile_rows)
    if q.outliers is not None and q.outliers.count:
        fields.update(zip(("outlier_row_ptr", "outlier_cols", "outlier_values"), _pack_outliers(q.outliers, keep, rows)))
    if q.perm is not None:
        perm = q.perm.to(torch.int64)
        if perm.shape != (cols,) or not torch.equal(perm.sort().values, torch.arange(cols, device=perm.device)):
            raise ValueError(f"perm must be a permutation of the {cols} input columns")
        fields["perm"] = perm.to(torch.int32).to(torch.int16)  # wraps above 32767: read as unsigned
    return fields


def check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes in [0, 2^bits) (any width 2..8: group_quant.check_codes knows only 2, 3, 4, 8)."""
    if codes.is_floating_point() and not torch.equal(codes, codes.round()):
        raise ValueError("codes must be integers")
    wide = codes.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= 1 << bits):
        raise ValueError(f"codes outside [0, {(1 << bits) - 1}] for {bits} bits: [{int(wide.min())}, {int(wide.max())}]")
    return wide


def _pack_outliers(outliers: Outliers, keep: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR (row_ptr int32 [rows + 1], cols int16, values float16), ascending column inside a row; outliers
    the mask prunes are dropped (dequantize zeroes them); a repeated position keeps its last value, as the
    indexed assignment of dequantize does."""
    if outliers.row_ptr.numel() != rows + 1:
        raise ValueError(f"outlier row pointers must be [out + 1] = {rows + 1}, got {outliers.row_ptr.numel()}")
    row, col = outliers.positions()
    values = exact_cast(outliers.values.float(), torch.float16, "outlier value")
    if keep is not None:
        kept = keep[row, col]
        row, col, values = row[kept], col[kept], values[kept]
    key = row * MAX_COLUMNS + col
    # last occurrence of each position wins: sort stably, keep the last of each run
    order = torch.sort(key, stable=True).indices
    key, values = key[order], values[order]
    last = torch.ones_like(key, dtype=torch.bool)
    last[:-1] = key[1:] != key[:-1]
    key, values = key[last], values[last]
    counts = torch.bincount(key // MAX_COLUMNS, minlength=rows)
    row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return row_ptr, (key % MAX_COLUMNS).to(torch.int32).to(torch.int16), values


def extras_meta(fields: dict, tile_rows: int) -> dict:
    meta = {"outliers": 0 if fields["outlier_values"] is None else int(fields["outlier_values"].numel()),
            "perm": fields["perm"] is not None, "keep": fields["bitmask"] is not None}
    if meta["keep"]:
        meta.update(tile_rows=tile_rows, code_words=int(fields["codes"].numel()))
    return meta


def extras_tensors(fields: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": fields[name] for name in FIELDS if fields[name] is not None}


def extras_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> dict[str, torch.Tensor | None]:
    """The shared fields read back, every tensor checked for its dtype and shape."""
    (rows, cols), bits, nnz = meta["shape"], meta["bits"], meta["outliers"]
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{prefix}: bits {bits} not supported")
    fields: dict[str, torch.Tensor | None] = dict.fromkeys(FIELDS)
    if meta["keep"]:
        tiles = -(-rows // meta["tile_rows"])
        fields["codes"] = check_tensor(tensors, f"{prefix}.codes", (torch.int32,), (meta["code_words"],))
        fields["bitmask"] = check_tensor(tensors, f"{prefix}.bitmask", (torch.int32,), (rows, words_for(cols, 1)))
        fields["code_offsets"] = check_tensor(tensors, f"{prefix}.code_offsets", (torch.int32, torch.int64), (tiles + 1,))
    else:
        fields["codes"] = check_tensor(tensors, f"{prefix}.codes", (torch.int32,), (rows, words_for(cols, bits)))
    if nnz:
        fields["outlier_row_ptr"] = check_tensor(tensors, f"{prefix}.outlier_row_ptr", (torch.int32,), (rows + 1,))
        fields["outlier_cols"] = check_tensor(tensors, f"{prefix}.outlier_cols", (torch.int16,), (nnz,))
        fields["outlier_values"] = check_tensor(tensors, f"{prefix}.outlier_values", (torch.float16,), (nnz,))
    if meta["perm"]:
        fields["perm"] = check_tensor(tensors, f"{prefix}.perm", (torch.int16,), (cols,))
    return fields


def unsigned16(values: torch.Tensor) -> torch.Tensor:
    """int16 storage read as unsigned, int64."""
    return values.to(torch.int64) & 0xFFFF


def read_codes(packed, cols: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(int64 codes [out, in] in stored column order, 0 where pruned; the keep mask or None)."""
    if packed.bitmask is None:
        return read_fields(packed.codes, packed.bits, cols), None
    mask = bitmap.read_bitmask(packed.bitmask, cols)
    codes = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
    codes[mask] = sparse_quant.read_rows(packed.codes, mask.sum(1), packed.bits)
    return codes, mask


def finish_weight(grid: torch.Tensor, packed, mask: torch.Tensor | None) -> torch.Tensor:
    """The dequantized grid [out, in] (stored order) -> the weight, as QuantizedWeight.dequantize: outliers
    replace their weights, the mask zeroes the pruned ones, the permutation restores the column order."""
    weight = grid
    if packed.outlier_values is not None:
        counts = (packed.outlier_row_ptr[1:] - packed.outlier_row_ptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        weight[rows, unsigned16(packed.outlier_cols)] = packed.outlier_values.float()
    if mask is not None:
        weight = torch.where(mask, weight, torch.zeros_like(weight))
    if packed.perm is not None:
        restored = torch.empty_like(weight)
        restored[:, unsigned16(packed.perm)] = weight
        weight = restored
    return weight


def stored_order(x: torch.Tensor, packed) -> torch.Tensor:
    """x [batch, in] in the stored column order: x[:, perm] (a kernel gathers x once a call)."""
    return x if packed.perm is None else x[:, unsigned16(packed.perm)]


def iter_rows(packed, cols: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(row, its kept stored columns int64, their codes int64) row by row, decoded from the words as a
    kernel walks them: a dense row from its own words, a masked one from its tile's first word on."""
    rows = packed.shape[0]
    start = 0
    for r in range(rows):
        if packed.bitmask is None:
            columns = torch.arange(cols, device=packed.codes.device)
            codes = read_fields(packed.codes[r : r + 1], packed.bits, cols)[0]
        else:
            if r % packed.tile_rows == 0:
                start = int(packed.code_offsets[r // packed.tile_rows])
            columns = sparse_quant.read_bitmask_row(packed.bitmask[r], cols)
            words = words_for(columns.numel(), packed.bits)
            codes = read_fields(packed.codes[start : start + words].unsqueeze(0), packed.bits, columns.numel())[0]
            start += words
        yield r, columns, codes


def row_outliers(packed, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r's outliers: (stored columns int64, float32 values)."""
    if packed.outlier_values is None:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.float()
    a, b = int(packed.outlier_row_ptr[r]), int(packed.outlier_row_ptr[r + 1])
    return unsigned16(packed.outlier_cols[a:b]), packed.outlier_values[a:b].float()


def apply_row_outliers(weights: torch.Tensor, columns: torch.Tensor, packed, r: int) -> torch.Tensor:
    """A row's weights at its kept `columns` with the row's outliers in place of their grid values."""
    cols, values = row_outliers(packed, r)
    if cols.numel():
        where = torch.searchsorted(columns, cols)  # outliers sit at kept columns (packing drops the others)
        weights = weights.clone()
        weights[where] = values
    return weights
