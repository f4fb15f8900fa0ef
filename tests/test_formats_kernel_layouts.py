"""The stored formats kernels read row by row (nm, bitmap, group_quant, sparse_quant): exact round trips
on odd shapes and edge cases, the tensors and meta round trip, the reference matmul against the unpacked
weight, the bytes counted, the bit layouts themselves, and bits/param measured from the stored bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from compress.formats import bitmap, nm, sparse_quant
from compress.formats import group_quant as gq
from compress.formats.quantized import QuantizedWeight
from compress.methods.gptq import gptq_quantize
from compress.methods.quantization import packed_weight
from compress.methods.rtn import rtn_quantize
from compress.methods.sparsity import prune_mask


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(rows: int, cols: int, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    """Random weights exactly representable in `dtype`, as float32."""
    return torch.randn(rows, cols, generator=_gen(seed)).to(dtype).float()


def _nm_mask(rows: int, cols: int, n: int, m: int, seed: int = 1) -> torch.Tensor:
    scores = torch.rand(rows, cols, generator=_gen(seed))
    return prune_mask(scores, (m - n) / m, f"{n}:{m}")


def _random_mask(rows: int, cols: int, density: float, seed: int = 2) -> torch.Tensor:
    return torch.rand(rows, cols, generator=_gen(seed)) < density


def _statistics(rows: int, groups: int, bits: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (torch.rand(rows, groups, generator=_gen(seed)) * 0.1 + 1e-3).half()
    zero = torch.randint(0, 2**bits, (rows, groups), generator=_gen(seed + 1)).float()
    return scale, zero


def _codes(rows: int, cols: int, bits: int, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, 2**bits, (rows, cols), generator=_gen(seed)).to(torch.uint8)


def _check(module, packed, weight: torch.Tensor) -> None:
    """Exact round trip, tensors + meta round trip, nbytes as stored, reference matmul within fp32 rounding."""
    unpacked = module.unpack(packed)
    assert unpacked.dtype == torch.float32 and torch.equal(unpacked, weight)
    tensors = module.to_tensors(packed, "model.layers.0.mlp.up_proj")
    meta = json.loads(json.dumps(packed.meta))
    again = module.from_tensors(tensors, "model.layers.0.mlp.up_proj", meta)
    assert torch.equal(module.unpack(again), weight)
    pairs = zip(module.to_tensors(again, "p").values(), module.to_tensors(packed, "p").values())
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in pairs)
    assert all(t.dtype != torch.int64 or key.endswith("offsets") for key, t in tensors.items())
    # nbytes is the data section of the safetensors file the tensors make
    blob = save(tensors)
    header = int.from_bytes(blob[:8], "little")
    assert module.nbytes(packed) == len(blob) - 8 - header == sum(t.numel() * t.element_size() for t in tensors.values())
    _check_matmul(module, packed, unpacked)


def _check_matmul(module, packed, weight: torch.Tensor) -> None:
    for batch in (1, 16):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, weight.shape[1], generator=_gen(batch)).to(dtype)
            out = module.reference_matmul(x, packed)
            assert out.dtype == dtype and out.shape == (batch, weight.shape[0])
            expected = x.float() @ weight.T
            bound = 1e-5 * (x.float().abs() @ weight.abs().T) + 1e-30  # fp32 rounding of the sums
            if dtype == torch.bfloat16:
                bound = bound + 2**-8 * expected.abs()  # and the output rounded to bfloat16
            assert ((out.float() - expected).abs() <= bound).all()
    assert torch.equal(module.reference_matmul(torch.zeros(2, weight.shape[1]), packed), torch.zeros(2, weight.shape[0]))


def _bits_per_param(module, packed) -> float:
    return module.nbytes(packed) * 8 / (packed.shape[0] * packed.shape[1])


# -- N:M ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols, n, m", [(3, 8, 2, 4), (17, 24, 1, 4), (33, 40, 4, 8), (17, 100, 2, 4), (3, 24, 2, 8),
                                              (5, 48, 3, 16), (17, 24, 2, 3), (3, 40, 1, 2), (17, 64, 5, 8), (3, 8, 7, 8)])
def test_nm_round_trips(rows, cols, n, m):
    mask = _nm_mask(rows, cols, n, m)
    weight = _weight(rows, cols) * mask
    weight[0] = 0  # a row whose kept weights are all exactly zero: still N stored a group
    weight[-1, :m] = torch.where(mask[-1, :m], 0.0, weight[-1, :m])  # a group of zero kept values
    packed = nm.pack(weight, mask, n, m)
    assert packed.values.shape == (rows, cols * n // m) and packed.values.dtype == torch.bfloat16
    assert packed.indices.dtype == torch.int32 and packed.indices.shape == (rows, -(-cols * n // m // (32 // nm.index_bits(m))))
    _check(nm, packed, weight)


def test_nm_float16_values_and_index_bit_order():
    # 2:4, one row of 8 groups: indices (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) (0,1) (2,3), 2 bits each
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (0, 1), (2, 3)]
    mask = torch.zeros(1, 32, dtype=torch.bool)
    for group, pair in enumerate(pairs):
        mask[0, [group * 4 + i for i in pair]] = True
    weight = _weight(1, 32, dtype=torch.float16) * mask
    packed = nm.pack(weight, mask, 2, 4, dtype=torch.float16)
    indices = [i for pair in pairs for i in pair]
    word = sum(i << (2 * k) for k, i in enumerate(indices))
    assert packed.indices.shape == (1, 1) and int(packed.indices[0, 0]) & 0xFFFFFFFF == word
    assert torch.equal(packed.values[0].float(), weight[mask])
    _check(nm, packed, weight)
    # 3-bit indices (M = 8): 10 a word, the top 2 bits zero, the 11th index opens the next word
    mask = torch.zeros(1, 88, dtype=torch.bool)
    mask.view(11, 8)[:, 7] = True
    packed = nm.pack(_weight(1, 88) * mask, mask, 1, 8)
    assert packed.indices.tolist() == [[sum(7 << (3 * k) for k in range(10)), 7]]


def test_nm_refusals():
    mask = _nm_mask(4, 16, 2, 4)
    mask[2, 5] = ~mask[2, 5]
    with pytest.raises(ValueError, match=r"row 2, group 1 \(columns 4..7\)"):
        nm.pack(_weight(4, 16) * mask, mask, 2, 4)
    with pytest.raises(ValueError, match="not divisible by M=4"):
        nm.pack(torch.zeros(2, 10), torch.ones(2, 10, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M <= 16"):
        nm.pack(torch.zeros(2, 32), torch.ones(2, 32, dtype=torch.bool), 2, 32)
    mask = _nm_mask(4, 16, 2, 4)
    with pytest.raises(ValueError, match="nonzero but pruned"):
        nm.pack(_weight(4, 16), mask, 2, 4)
    with pytest.raises(ValueError, match="not exactly representable"):
        nm.pack(torch.randn(4, 16, generator=_gen(0)) * mask, mask, 2, 4)


# -- bitmap ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols, density, tile_rows", [(3, 8, 0.5, 16), (17, 40, 0.3, 16), (33, 100, 0.05, 16), (33, 100, 0.7, 4),
                                                            (17, 24, 0.5, 1), (33, 64, 0.3, 32)])
def test_bitmap_round_trips(rows, cols, density, tile_rows):
    mask = _random_mask(rows, cols, density)
    mask[1] = False  # a row with no kept weight
    mask[2] = True  # an all-kept row
    weight = _weight(rows, cols) * mask
    weight[2, 3] = 0.0  # a kept weight that is exactly zero: stored
    packed = bitmap.pack(weight, mask, tile_rows=tile_rows)
    assert packed.values.numel() == int(mask.sum()) and packed.bitmask.shape == (rows, -(-cols // 32))
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    assert packed.tile_offsets.dtype == torch.int32 and packed.tile_offsets.tolist() == starts[list(range(0, rows, tile_rows)) + [rows]].tolist()
    _check(bitmap, packed, weight)
    # without a mask, the nonzero weights are kept
    _check(bitmap, bitmap.pack(weight, dtype="float16", tile_rows=tile_rows), weight)


def test_bitmap_bit_order_and_empty_rows():
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, [0, 5, 31, 32]] = True
    packed = bitmap.pack(_weight(2, 40) * mask, mask)
    assert [[w & 0xFFFFFFFF for w in row] for row in packed.bitmask.tolist()] == [[0, 0], [1 | 1 << 5 | 1 << 31, 1]]
    _check(bitmap, packed, _weight(2, 40) * mask)
    empty = bitmap.pack(torch.zeros(5, 8))
    assert empty.values.numel() == 0 and empty.tile_offsets.tolist() == [0, 0]
    _check(bitmap, empty, torch.zeros(5, 8))


# -- group quantization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", gq.SUPPORTED_BITS)
@pytest.mark.parametrize("rows, cols, group_size", [(3, 8, 4), (17, 24, 16), (33, 100, 32), (17, 40, 128), (3, 23, 8)])
def test_group_quant_round_trips(bits, rows, cols, group_size):
    groups = -(-cols // group_size)
    codes, (scale, zero) = _codes(rows, cols, bits), _statistics(rows, groups, bits)
    codes[0], codes[1] = 0, 2**bits - 1  # the extreme codes (all bits of a code set)
    q = QuantizedWeight((rows, cols), bits, group_size, codes, scale, zero)
    packed = gq.pack(codes, scale, zero, bits, group_size)
    assert packed.zero_kind == "integer" and packed.codes.shape == (rows, -(-cols // (32 // bits)))
    _check(gq, packed, q.dequantize())
    halves = (zero + 0.5).half()  # zero points that are not integers are stored in float16
    q = QuantizedWeight((rows, cols), bits, group_size, codes, scale, halves)
    packed = gq.pack(codes, scale, halves, bits, group_size)
    assert packed.zero_kind == "float16" and packed.zero.dtype == torch.float16
    _check(gq, packed, q.dequantize())


def test_group_quant_three_bit_words_never_straddle():
    codes = torch.full((2, 23), 7, dtype=torch.uint8)
    codes[1] = torch.arange(23) % 8
    packed = gq.pack(codes, torch.ones(2, 1).half(), torch.zeros(2, 1), 3, 32)
    words = [[w & 0xFFFFFFFF for w in row] for row in packed.codes.tolist()]
    assert words[0] == [0x3FFFFFFF, 0x3FFFFFFF, 0x1FF]  # 10 codes a word, 30 bits used, 2 padding bits zero
    assert words[1] == [sum((k % 8) << (3 * (k - start)) for k in range(start, min(start + 10, 23))) for start in (0, 10, 20)]
    assert torch.equal(gq.unpack(packed), codes.float())


def test_group_quant_refusals():
    scale, zero = _statistics(2, 1, 4)
    with pytest.raises(ValueError, match="outside"):
        gq.pack(torch.full((2, 8), 16), scale, zero, 4, 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        gq.pack(torch.zeros(2, 8), scale, zero, 5, 8)
    with pytest.raises(ValueError, match="zero points must be integers"):
        gq.pack(torch.zeros(2, 8), scale, zero + 0.5, 4, 8, zero_kind="integer")
    with pytest.raises(ValueError, match="not exactly representable in torch.float16"):
        gq.pack(torch.zeros(2, 8), torch.full((2, 1), 0.1), zero, 4, 8)
    with pytest.raises(ValueError, match=r"\[out, groups\]"):
        gq.pack(torch.zeros(2, 9), scale, zero, 4, 8)
    lut = QuantizedWeight((2, 8), 4, 8, torch.zeros(2, 8), None, None, lut=torch.zeros(2, 16).half())
    with pytest.raises(ValueError, match="lut"):
        gq.from_quantized(lut)


@pytest.mark.parametrize("bits", gq.SUPPORTED_BITS)
@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-symmetric", "gptq-per-row"])
def test_group_quant_from_real_quantizers_is_dequantize(bits, method):
    weight = torch.randn(33, 100, generator=_gen(bits))
    inputs = torch.randn(256, 100, generator=_gen(bits + 1))
    if method == "rtn":
        quantized, grids = rtn_quantize(weight, bits, 32)
        q = packed_weight(quantized, grids, bits, 32)
    else:
        group_size = None if method == "gptq-per-row" else 32
        quantized, q = gptq_quantize(weight, inputs.T @ inputs, bits, group_size, symmetric=method == "gptq-symmetric")
    packed = gq.from_quantized(q)
    assert torch.equal(gq.unpack(packed), q.dequantize()) and torch.equal(gq.unpack(packed), quantized)
    _check(gq, packed, quantized)


# -- sparse + quantized ---------------------------------------------------------------------------------


def _sparse_case(rows, cols, bits, group_size, mask):
    codes, (scale, zero) = _codes(rows, cols, bits), _statistics(rows, -(-cols // group_size), bits)
    return codes, scale, zero, QuantizedWeight((rows, cols), bits, group_size, codes, scale, zero, keep=mask).dequantize()


@pytest.mark.parametrize("bits", gq.SUPPORTED_BITS)
@pytest.mark.parametrize("rows, cols, pattern, group_size", [(3, 8, "2:4", 4), (17, 24, "2:4", 16), (33, 40, "4:8", 16), (17, 100, "1:4", 32),
                                                             (3, 24, "2:8", 128)])
def test_sparse_quant_nm_round_trips(bits, rows, cols, pattern, group_size):
    n, m = map(int, pattern.split(":"))
    mask = _nm_mask(rows, cols, n, m)
    codes, scale, zero, weight = _sparse_case(rows, cols, bits, group_size, mask)
    packed = sparse_quant.pack(mask, codes, scale, zero, bits, group_size, pattern)
    assert packed.codes.shape == (rows, -(-cols * n // m // (32 // bits))) and packed.bitmask is None
    _check(sparse_quant, packed, weight)


@pytest.mark.parametrize("bits", gq.SUPPORTED_BITS)
@pytest.mark.parametrize("rows, cols, density, group_size, tile_rows", [(3, 8, 0.5, 4, 16), (17, 40, 0.3, 16, 4), (33, 100, 0.7, 32, 16),
                                                                        (33, 100, 0.05, 128, 1)])
def test_sparse_quant_bitmap_round_trips(bits, rows, cols, density, group_size, tile_rows):
    mask = _random_mask(rows, cols, density)
    mask[0], mask[-1] = False, True  # a row with no kept weight, an all-kept row
    codes, scale, zero, weight = _sparse_case(rows, cols, bits, group_size, mask)
    packed = sparse_quant.pack(mask, codes, scale, zero, bits, group_size, tile_rows=tile_rows)
    per = 32 // bits
    row_words = (mask.sum(1) + per - 1) // per
    assert packed.codes.shape == (int(row_words.sum()),)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), row_words.cumsum(0)])
    assert packed.code_offsets.tolist() == starts[list(range(0, rows, tile_rows)) + [rows]].tolist()
    _check(sparse_quant, packed, weight)


@pytest.mark.parametrize("bits", gq.SUPPORTED_BITS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparse_quant_as_group_quant_is_the_same_weight(bits, pattern):
    # the grid view the GPU kernels of dense grids read: every pruned weight coded as its group's zero point
    rows, cols, group_size = 19, 96, 32
    mask = _random_mask(rows, cols, 0.5) if pattern == "unstructured" else _nm_mask(rows, cols, *map(int, pattern.split(":")))
    codes, scale, zero, weight = _sparse_case(rows, cols, bits, group_size, mask)
    packed = sparse_quant.pack(mask, codes, scale, zero, bits, group_size, pattern)
    grid = sparse_quant.as_group_quant(packed)
    assert grid.codes.shape == (rows, -(-cols // (32 // bits)))
    assert torch.equal(gq.unpack(grid), sparse_quant.unpack(packed)) and torch.equal(gq.unpack(grid), weight)
    float_zero = sparse_quant.pack(mask, codes, scale, zero + 0.5, bits, group_size, pattern, "float16")
    with pytest.raises(ValueError, match="float zero points"):
        sparse_quant.as_group_quant(float_zero)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparse_quant_from_gptq_with_a_mask_is_dequantize(pattern):
    weight = torch.randn(17, 96, generator=_gen(5))
    inputs = torch.randn(256, 96, generator=_gen(6))
    keep = prune_mask(weight.abs(), 0.5, pattern)
    quantized, q = gptq_quantize(weight, inputs.T @ inputs, 3, 32, keep=keep)
    packed = sparse_quant.from_quantized(q, pattern)
    assert torch.equal(sparse_quant.unpack(packed), q.dequantize()) and torch.equal(sparse_quant.unpack(packed), quantized)
    _check(sparse_quant, packed, quantized)
    with pytest.raises(ValueError, match="no mask"):
        sparse_quant.from_quantized(gptq_quantize(weight, inputs.T @ inputs, 3, 32)[1])


def test_sparse_quant_refuses_a_mask_that_is_not_its_pattern():
    mask = _random_mask(4, 16, 0.5)
    codes, scale, zero, _ = _sparse_case(4, 16, 4, 8, mask)
    with pytest.raises(ValueError, match="mask is not 2:4: row"):
        sparse_quant.pack(mask, codes, scale, zero, 4, 8, "2:4")


# -- bits/param, from the stored bytes ------------------------------------------------------------------


def test_bits_per_param_on_a_4096_square_weight():
    rows = cols = 4096
    weight = torch.randn(rows, cols, generator=_gen(7))
    nm_mask = prune_mask(weight.abs(), 0.5, "2:4")
    measured = {"2:4 bf16": _bits_per_param(nm, nm.pack((weight * nm_mask).bfloat16().float(), nm_mask, 2, 4))}
    sparse = prune_mask(weight.abs(), 0.7, "unstructured")
    measured["70% bitmap bf16"] = _bits_per_param(bitmap, bitmap.pack((weight * sparse).bfloat16().float(), sparse))
    for bits in (4, 3):
        q = packed_weight(*rtn_quantize(weight, bits, 128), bits, 128)
        measured[f"int{bits} g128"] = _bits_per_param(gq, gq.from_quantized(q))
    q = packed_weight(*rtn_quantize(weight * nm_mask, 4, 128), 4, 128, keep=nm_mask)
    measured["2:4 + int4 g128"] = _bits_per_param(sparse_quant, sparse_quant.from_quantized(q, "2:4"))
    print(json.dumps(measured, indent=1))
    assert measured["2:4 bf16"] == 16 * 2 / 4 + 2 * 2 / 4 == 9
    assert measured["70% bitmap bf16"] == (rows * cols // 32 * 32 + int(sparse.sum()) * 16 + (rows // 16 + 1) * 32) / (rows * cols)
    assert abs(measured["70% bitmap bf16"] - (1 + 0.3 * 16)) < 0.01
    assert measured["int4 g128"] == 4 + 20 / 128
    assert measured["int3 g128"] == (410 * 32 + 32 * 16 + 4 * 32) / 4096  # 10 codes a word: 3.2 bits a code
    assert measured["2:4 + int4 g128"] == (2048 * 4 + 2048 * 2 + 32 * 16 + 32 * 4) / 4096
