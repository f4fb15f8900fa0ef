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
_TABLES: dict[tuple[int, str], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}


@triton.jit
def _ternary_dict_kernel(x_ptr, codes_ptr, offsets_ptr, minmax_ptr, slots_ptr, length_ptr, y_ptr, N, K, B, ENTRIES, stride_x, stride_y,
                         BLOCK_R: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b0 = tl.program_id(1) * BP
    row_ok = rows < N
    start = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    count = tl.load(offsets_ptr + rows + 1, mask=row_ok, other=0) - start
    lo = tl.load(minmax_ptr + 2 * rows, mask=row_ok, other=0.0).to(tl.float32)
    hi = tl.load(minmax_ptr + 2 * rows + 1, mask=row_ok, other=0.0).to(tl.float32)
    slot = tl.arange(0, S)[None, None, :]
    batch_slot = tl.arange(0, BP)[None, :]
    acc = tl.zeros([BLOCK_R, BP], dtype=tl.float32)
    acc_min = tl.zeros([BLOCK_R, C, S], dtype=tl.float32)  # batch 1: summed per lane, reduced once at the end
    acc_max = tl.zeros([BLOCK_R, C, S], dtype=tl.float32)
    carry = tl.zeros([BLOCK_R], dtype=tl.int32)  # the column where each row's next code starts
    longest = tl.max(count, axis=0)
    j0 = 0
    while j0 < longest:  # (a while loop: the interpreter takes no tensor bound in range())
        k = j0 + tl.arange(0, C)[None, :]
        live = k < count[:, None]
        code = tl.load(codes_ptr + start[:, None] + k, mask=live, other=0).to(tl.int32) & 0xFFFF
        live = live & (code < ENTRIES)
        length = tl.load(length_ptr + code, mask=live, other=0)
        first = carry[:, None] + tl.cumsum(length, axis=1) - length  # [BLOCK_R, C]: each code's first column
        carry += tl.sum(length, axis=1)
        entry = tl.load(slots_ptr + S * code[:, :, None] + slot, mask=live[:, :, None], other=-1)  # [BLOCK_R, C, S]
        col = first[:, :, None] + (entry & 31)
        is_max = (entry & 32) != 0
        load = (entry >= 0) & (col < K)  # an empty slot is -1; columns past K are padding
        if BP == 1:
            xv = tl.load(x_ptr + b0.to(tl.int64) * stride_x + col, mask=load & (b0 < B), other=0.0).to(tl.float32)
            acc_max += tl.where(is_max, xv, 0.0)
            acc_min += tl.where(is_max, 0.0, xv)
        else:
            weight = tl.where(is_max, hi[:, None, None], lo[:, None, None])
            for i in tl.static_range(BP):
                b = b0 + i
                xv = tl.load(x_ptr + b.to(tl.int64) * stride_x + col, mask=load & (b < B), other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(xv * weight, axis=2), axis=1)  # [BLOCK_R]
                acc += tl.where(batch_slot == i, part[:, None], 0.0)
        j0 += C
    if BP == 1:
        total = lo * tl.sum(tl.sum(acc_min, axis=2), axis=1) + hi * tl.sum(tl.sum(acc_max, axis=2), axis=1)
        acc = tl.where(batch_slot == 0, total[:, None], 0.0)
    bs = b0 + batch_slot
    tl.store(y_ptr + bs.to(tl.int64) * stride_y + rows[:, None], acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (bs < B))


def slot_table(kernel_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's re-layout of a dictionary's (min_mask, max_mask, length) table: int32 [codewords, S]
    listing each codeword's nonzero weights, offset | 32 * is_max (-1: empty slot), S the most nonzeros any
    codeword has (rounded up to a power of two); and the lengths, int32 [codewords]. A codeword covers up
    to 28 weights but holds few nonzeros (2-3 at QMoE's sparsity), so the kernel touches S lanes a code, not 32."""
    lanes = torch.arange(32, dtype=torch.int32)
    table = kernel_table.to(torch.int32)
    is_min = (table[:, :1] >> lanes) & 1
    is_max = (table[:, 1:2] >> lanes) & 1
    nonzero = (is_min | is_max).bool()
    width = triton.next_power_of_2(max(1, int(nonzero.sum(1).max())))
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :width]  # nonzero lanes first, in column order
    entry = (order + 32 * is_max.gather(1, order)).to(torch.int32)
    entry[~nonzero.gather(1, order)] = -1
    return entry.contiguous(), table[:, 2].contiguous()


def device_table(packed: ternary_dict.TernaryDictWeight, device: torch.device, kernel_table: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's dictionary as the kernel reads it (slot_table) on `device`, built once per dictionary
    and device (the dictionaries themselves are cached by the format, so a few live at a time)."""
    host = ternary_dict.dictionary_of(packed).kernel_table if kernel_table is None else kernel_table
    key = (id(host), str(device))
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not host:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        slots, lengths = slot_table(host.cpu())
        hit = _TABLES[key] = (host, (slots.to(device), lengths.to(device)))
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
    if table is not None and (table.dim() != 2 or table.shape[1] != 3 or not 1 <= table.shape[0] <= TABLE_ROWS or table.dtype != torch.int32):
        raise ValueError(f"kernel_table must be int32 [codewords <= {TABLE_ROWS}, 3], got {table.dtype} {tuple(table.shape)}")
    slots, lengths = device_table(packed, x.device, table)
    codes, offsets, minmax = (t.to(x.device).contiguous() for t in (packed.codes, packed.row_offsets, packed.minmax))
    if codes.dtype != torch.int16 or offsets.dtype != torch.int32 or minmax.dtype != torch.float16:
        raise TypeError(f"codes, row_offsets, minmax must be int16, int32, float16; got {codes.dtype}, {offsets.dtype}, {minmax.dtype}")
    if lengths.shape[0] < TABLE_ROWS and codes.numel() and int((codes.to(torch.int32) & 0xFFFF).max()) >= lengths.shape[0]:
        raise ValueError(f"a code lies outside the dictionary of {lengths.shape[0]} codewords")
    x2 = x.reshape(-1, cols).contiguous()
    batch = x2.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    if batch and rows:
        bp = min(triton.next_power_of_2(batch), MAX_BATCH)
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(batch, bp))
        _ternary_dict_kernel[grid](x2, codes, offsets, minmax, slots, lengths, y, rows, cols, batch, lengths.shape[0], x2.stride(0),
                                   y.stride(0), BLOCK_R=block_rows, C=chunk, S=slots.shape[1], BP=bp, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], rows)
