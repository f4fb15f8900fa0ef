"""Triton kernel: y = x @ W.T straight from QMoE's dictionary-coded ternary weights (compress.formats.ternary_dict)
on a GPU (or on CPU tensors under TRITON_INTERPRET=1).

Import this module only when Triton is wanted: it imports Triton at the top (compress/kernels/dispatch.py
does so lazily, so `import compress` and every CPU path stay free of it).

Design: a program owns BLOCK_R output rows and one slice of up to 16 activation rows. It walks its rows'
codes in chunks of C codes (a [BLOCK_R, C] tile; rows that are done are masked), gathers each code's
(min_mask, max_mask, length) from the dictionary's kernel table, places each code's run by a running sum
of the lengths (tl.cumsum inside the chunk plus the carry of the chunks before), and expands the chunk to a
[BLOCK_R, C, 32] tile of (column, weight): weight = min_r where the min mask has the bit, max_r where the
max mask has it, else 0. x is loaded only where the weight is nonzero (masked loads: ~12% of the lanes at
QMoE's sparsity; x stays in L1/L2) and y[b, r] = sum(x * weight) is accumulated in fp32, so the weight
matrix never exists. The loop runs until the block's longest row is done; the expansion is done once a
chunk and shared by the slice's activation rows, which are looped over inside the program (batch <= 16);
a larger batch takes several slices (grid axis 1), each decoding the codes again: correct, and slower per
activation row than a dense tensor-core matmul long before that (this is a batch-1-to-few kernel).
y comes back in x's dtype. Codes whose index lies past a smaller dictionary's table are refused up front.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats import ternary_dict

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BATCH = 16  # activation rows a program loops over (one decode of the codes for all of them)
# rows a program, codes a row per step ([4, 16, 32]: 2048 lanes, 16 a thread in 4 warps), warps: a guess, not tuned on
# a GPU yet; 4 rows a program gives 1024 programs for 4096 output rows, several per multiprocessor
BLOCK_R, CHUNK, NUM_WARPS = 4, 16, 4
TABLE_ROWS = 65536
_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit
def _ternary_dict_kernel(x_ptr, codes_ptr, offsets_ptr, minmax_ptr, table_ptr, y_ptr, N, K, B, ENTRIES, stride_x, stride_y,
                         BLOCK_R: tl.constexpr, C: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b0 = tl.program_id(1) * BP
    row_ok = rows < N
    start = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    count = tl.load(offsets_ptr + rows + 1, mask=row_ok, other=0) - start
    lo = tl.load(minmax_ptr + 2 * rows, mask=row_ok, other=0.0).to(tl.float32)
    hi = tl.load(minmax_ptr + 2 * rows + 1, mask=row_ok, other=0.0).to(tl.float32)
    lane = tl.arange(0, 32)[None, None, :]
    slot = tl.arange(0, BP)[None, :]
    acc = tl.zeros([BLOCK_R, BP], dtype=tl.float32)
    carry = tl.zeros([BLOCK_R], dtype=tl.int32)  # the column where each row's next code starts
    longest = tl.max(count, axis=0)
    j0 = 0
    while j0 < longest:  # (a while loop: the interpreter takes no tensor bound in range())
        k = j0 + tl.arange(0, C)[None, :]
        live = k < count[:, None]
        code = tl.load(codes_ptr + start[:, None] + k, mask=live, other=0).to(tl.int32) & 0xFFFF
        live = live & (code < ENTRIES)
        entry = table_ptr + 3 * code
        min_mask = tl.load(entry, mask=live, other=0)
        max_mask = tl.load(entry + 1, mask=live, other=0)
        length = tl.load(entry + 2, mask=live, other=0)
        first = carry[:, None] + tl.cumsum(length, axis=1) - length  # [BLOCK_R, C]: each code's first column
        carry += tl.sum(length, axis=1)
        col = first[:, :, None] + lane  # [BLOCK_R, C, 32]
        is_min = ((min_mask[:, :, None] >> lane) & 1) != 0
        is_max = ((max_mask[:, :, None] >> lane) & 1) != 0
        weight = tl.where(is_min, lo[:, None, None], tl.where(is_max, hi[:, None, None], 0.0))
        load = (is_min | is_max) & (col < K)  # a lane past the code's length has no bit; columns past K are padding
        for i in tl.static_range(BP):
            b = b0 + i
            xv = tl.load(x_ptr + b.to(tl.int64) * stride_x + col, mask=load & (b < B), other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(xv * weight, axis=2), axis=1)  # [BLOCK_R]
            acc += tl.where(slot == i, part[:, None], 0.0)
        j0 += C
    bs = b0 + slot
    tl.store(y_ptr + bs.to(tl.int64) * stride_y + rows[:, None], acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (bs < B))


def device_table(packed: ternary_dict.TernaryDictWeight, device: torch.device) -> torch.Tensor:
    """The weight's dictionary kernel table (int32 [codewords, 3]) on `device`, copied once per dictionary
    and device (the dictionaries themselves are cached by the format, so a few live at a time)."""
    host = ternary_dict.dictionary_of(packed).kernel_table
    key = (id(host), str(device))
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not host:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        hit = _TABLES[key] = (host, host.to(device=device, dtype=torch.int32).contiguous())
    return hit[1]


def ternary_dict_matmul(x: torch.Tensor, packed: ternary_dict.TernaryDictWeight, table: torch.Tensor | None = None,
                        block_rows: int = BLOCK_R, chunk: int = CHUNK, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """x [..., in] (float32, bfloat16 or float16) @ W.T -> [..., out] in x's dtype, fp32 accumulation, W
    never materialised. `table`: the dictionary's kernel table on x's device (TernaryDictLinear keeps one),
    else looked up and cached here. block_rows / chunk (powers of two) and num_warps: the tile, for tuning."""
    rows, cols = packed.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    if x.dtype not in DTYPES:
        raise TypeError(f"activations must be float32, bfloat16 or float16, got {x.dtype}")
    for name, value in (("block_rows", block_rows), ("chunk", chunk)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    table = device_table(packed, x.device) if table is None else table.to(x.device)
    if table.dim() != 2 or table.shape[1] != 3 or not 1 <= table.shape[0] <= TABLE_ROWS or table.dtype != torch.int32:
        raise ValueError(f"kernel_table must be int32 [codewords <= {TABLE_ROWS}, 3], got {table.dtype} {tuple(table.shape)}")
    codes, offsets, minmax = (t.to(x.device).contiguous() for t in (packed.codes, packed.row_offsets, packed.minmax))
    if codes.dtype != torch.int16 or offsets.dtype != torch.int32 or minmax.dtype != torch.float16:
        raise TypeError(f"codes, row_offsets, minmax must be int16, int32, float16; got {codes.dtype}, {offsets.dtype}, {minmax.dtype}")
    if table.shape[0] < TABLE_ROWS and codes.numel() and int((codes.to(torch.int32) & 0xFFFF).max()) >= table.shape[0]:
        raise ValueError(f"a code lies outside the dictionary of {table.shape[0]} codewords")
    x2 = x.reshape(-1, cols).contiguous()
    batch = x2.shape[0]
    y = torch.zeros(batch, rows, dtype=x.dtype, device=x.device)
    if batch and rows:
        bp = min(triton.next_power_of_2(batch), MAX_BATCH)
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(batch, bp))
        _ternary_dict_kernel[grid](x2, codes, offsets, minmax, table.contiguous(), y, rows, cols, batch, table.shape[0], x2.stride(0),
                                   y.stride(0), BLOCK_R=block_rows, C=chunk, BP=bp, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], rows)
