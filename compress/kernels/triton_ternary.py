"""Triton kernel: y = x @ W.T straight from QMoE's dictionary-coded ternary weights (compress.formats.ternary_dict)
on a GPU (or on CPU tensors under TRITON_INTERPRET=1).

Import this module only when Triton is wanted: it imports Triton at the top (compress/kernels/dispatch.py
does so lazily, so `import compress` and every CPU path stay free of it).

Design: a program owns BLOCK_R output rows and one slice of up to 16 activation rows. It walks its rows'
codes in chunks of C codes (a [BLOCK_R, C] tile, 128 codes by default; rows that are done are masked),
gathers each code's S slot entries from the dictionary's slot table (one 16-byte load a code for S = 4:
each entry holds a nonzero weight's column offset, whether it is max, and the codeword's length, so no
second table is read), places each code's run
by a running sum of the lengths (tl.cumsum inside the chunk plus the carry of the chunks before), and
loads x only at the codes' nonzero weights (~10% of the columns at QMoE's sparsity; x stays in L1/L2).
Batch 1 keeps per-lane sums of x at min and at max positions ([BLOCK_R, C, S]), reduced once at the end:
y = min_r * sum_min + max_r * sum_max. A batch of 2-16 flattens the chunk to [BLOCK_R, C * S] lanes and
loads x as [BLOCK_R, C * S, BP] (every activation row at once), one reduction a step for all of them; a
larger batch takes several slices (grid axis 1), each decoding the codes again. The weight matrix never
exists; y comes back in x's dtype, fp32 accumulation. Codes whose index lies past a smaller dictionary's
table are refused up front. Tiles: `tiles()`, set from benchmarks/qmoe_kernels.py --sweep on the H200.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats import ternary_dict

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BATCH = 16  # activation rows a program takes at once (one decode of the codes for all of them)
TABLE_ROWS = 65536
LENGTH_SHIFT, NONZERO = 8, 64  # slot entry: column offset (bits 0-4) | 32 if max | NONZERO if a weight | length << 8
_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit
def _ternary_dict_kernel(x_ptr, codes_ptr, offsets_ptr, minmax_ptr, slots_ptr, y_ptr, N, K, B, ENTRIES, stride_x, stride_y,
                         BLOCK_R: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b0 = tl.program_id(1) * BP
    row_ok = rows < N
    start = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    count = tl.load(offsets_ptr + rows + 1, mask=row_ok, other=0) - start
    lo = tl.load(minmax_ptr + 2 * rows, mask=row_ok, other=0.0).to(tl.float32)
    hi = tl.load(minmax_ptr + 2 * rows + 1, mask=row_ok, other=0.0).to(tl.float32)
    slot = tl.arange(0, S)[None, None, :]
    bs = b0 + tl.arange(0, BP)
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
        entry = tl.load(slots_ptr + S * code[:, :, None] + slot, mask=live[:, :, None], other=0)  # [BLOCK_R, C, S]
        length = tl.max(entry, axis=2) >> 8  # every slot of a code carries its length (LENGTH_SHIFT)
        first = carry[:, None] + tl.cumsum(length, axis=1) - length  # [BLOCK_R, C]: each code's first column
        carry += tl.sum(length, axis=1)
        col = first[:, :, None] + (entry & 31)
        is_max = (entry & 32) != 0
        load = ((entry & 64) != 0) & (col < K)  # (NONZERO) columns past K are padding
        if BP == 1:
            xv = tl.load(x_ptr + b0.to(tl.int64) * stride_x + col, mask=load & (b0 < B), other=0.0).to(tl.float32)
            acc_max += tl.where(is_max, xv, 0.0)
            acc_min += tl.where(is_max, 0.0, xv)
        else:  # the chunk's lanes flattened, x of every activation row of the slice at once
            col2 = tl.reshape(tl.where(load, col, -1), [BLOCK_R, C * S])
            w2 = tl.reshape(tl.where(is_max, hi[:, None, None], lo[:, None, None]), [BLOCK_R, C * S])
            xv = tl.load(x_ptr + bs.to(tl.int64)[None, None, :] * stride_x + col2[:, :, None],
                         mask=(col2[:, :, None] >= 0) & (bs[None, None, :] < B), other=0.0).to(tl.float32)
            acc += tl.sum(xv * w2[:, :, None], axis=1)
        j0 += C
    if BP == 1:
        total = lo * tl.sum(tl.sum(acc_min, axis=2), axis=1) + hi * tl.sum(tl.sum(acc_max, axis=2), axis=1)
        acc = tl.where(bs[None, :] == b0, total[:, None], 0.0)
    tl.store(y_ptr + bs.to(tl.int64)[None, :] * stride_y + rows[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (bs[None, :] < B))


def slot_table(kernel_table: torch.Tensor) -> torch.Tensor:
    """The kernel's re-layout of a dictionary's (min_mask, max_mask, length) table: int32 [codewords, S]
    listing each codeword's nonzero weights, offset | 32 * is_max | NONZERO, every slot (empty ones too)
    OR-ed with length << LENGTH_SHIFT; S the most nonzeros any codeword has (rounded up to a power of two).
    A codeword covers up to 28 weights but holds few nonzeros (2-3 at QMoE's sparsity), so the kernel touches
    S lanes a code (one 16-byte load for S = 4), not 32."""
    order, is_max, count = ternary_dict.codeword_nonzeros(kernel_table)
    width = triton.next_power_of_2(max(1, int(count.max())))
    entry = (order[:, :width] + 32 * is_max[:, :width] + NONZERO).to(torch.int32)
    entry[torch.arange(width) >= count[:, None]] = 0
    return (entry | (kernel_table[:, 2:3].to(torch.int32) << LENGTH_SHIFT)).contiguous()


def device_table(packed: ternary_dict.TernaryDictWeight, device: torch.device, kernel_table: torch.Tensor | None = None) -> torch.Tensor:
    """The weight's dictionary as the kernel reads it (slot_table) on `device`, built once per dictionary
    and device (the dictionaries themselves are cached by the format, so a few live at a time)."""
    host = ternary_dict.dictionary_of(packed).kernel_table if kernel_table is None else kernel_table
    key = (id(host), str(device))
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not host:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        hit = _TABLES[key] = (host, slot_table(host.cpu()).to(device))
    return hit[1]


def tiles(rows: int, codes: int, batch: int, device: torch.device) -> tuple[int, int, int]:
    """(block_rows, chunk, num_warps) for a weight of `rows` rows and `codes` codes in all, from benchmarks/qmoe_kernels.py
    --sweep on the H200 (2026-12-02, docs/qmoe.md): programs of 128 codes a step (block_rows x chunk) won on every
    expert shape. Batch 1: rows of up to 128 codes (Qwen experts) take one step, the chunk their code count rounded
    up to a power of two (3.3-4.8 us); longer rows take 32-code chunks where there are >= 64 rows a multiprocessor
    (Mixtral w1/w3: throughput-bound, short chunks waste fewer lanes past each row's end: 25 us against 34 with 128)
    and 128-code chunks otherwise (w2: latency-bound, fewer steps: 22 us against 28). Batch > 1: 4 rows x 32 codes,
    2 warps (the best, or within 5% of it, on 5 of the 6 shapes at batch 16)."""
    if batch > 1:
        return 4, 32, 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per_row = -(-codes // max(rows, 1))
    chunk = max(32, triton.next_power_of_2(per_row)) if per_row <= 128 else 32 if rows >= 64 * sms else 128
    return max(1, 128 // chunk), chunk, 2 if chunk <= 64 else 4


def ternary_dict_matmul(x: torch.Tensor, packed: ternary_dict.TernaryDictWeight, table: torch.Tensor | None = None,
                        block_rows: int | None = None, chunk: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x [..., in] (float32, bfloat16 or float16) @ W.T -> [..., out] in x's dtype, fp32 accumulation, W
    never materialised. `table`: the dictionary's kernel table on x's device (TernaryDictLinear keeps one),
    else looked up and cached here. block_rows / chunk (powers of two) and num_warps: the tile (None: tiles())."""
    rows, cols = packed.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    if x.dtype not in DTYPES:
        raise TypeError(f"activations must be float32, bfloat16 or float16, got {x.dtype}")
    auto = tiles(rows, packed.codes.numel(), x.numel() // max(cols, 1), x.device)
    block_rows, chunk, num_warps = (default if given is None else given for given, default in zip((block_rows, chunk, num_warps), auto))
    for name, value in (("block_rows", block_rows), ("chunk", chunk)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    if table is not None and (table.dim() != 2 or table.shape[1] != 3 or not 1 <= table.shape[0] <= TABLE_ROWS or table.dtype != torch.int32):
        raise ValueError(f"kernel_table must be int32 [codewords <= {TABLE_ROWS}, 3], got {table.dtype} {tuple(table.shape)}")
    slots = device_table(packed, x.device, table)
    codes, offsets, minmax = (t.to(x.device).contiguous() for t in (packed.codes, packed.row_offsets, packed.minmax))
    if codes.dtype != torch.int16 or offsets.dtype != torch.int32 or minmax.dtype != torch.float16:
        raise TypeError(f"codes, row_offsets, minmax must be int16, int32, float16; got {codes.dtype}, {offsets.dtype}, {minmax.dtype}")
    if slots.shape[0] < TABLE_ROWS and codes.numel() and int((codes.to(torch.int32) & 0xFFFF).max()) >= slots.shape[0]:
        raise ValueError(f"a code lies outside the dictionary of {slots.shape[0]} codewords")
    x2 = x.reshape(-1, cols).contiguous()
    batch = x2.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    if batch and rows:
        bp = min(triton.next_power_of_2(batch), MAX_BATCH)
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(batch, bp))
        _ternary_dict_kernel[grid](x2, codes, offsets, minmax, slots, y, rows, cols, batch, slots.shape[0], x2.stride(0), y.stride(0),
                                   BLOCK_R=block_rows, C=chunk, S=slots.shape[1], BP=bp, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], rows)
