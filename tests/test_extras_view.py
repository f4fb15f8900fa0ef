"""SpQR and LUT weights on the GPU kernels (compress/kernels/extras_view.py): without a keep mask such a weight
runs as its view (SpQR: group-quant; LUT: codes and fp32 tables for the split-K table mode) plus outlier
corrections. Checked against the format's plain-torch reference: with the
view's dense part computed by the group-quant reference (no Triton needed), by the Triton kernels (under
TRITON_INTERPRET=1 on CPU tensors where there is no GPU) and, where CUDA exists, through the module on the GPU
inside a captured CUDA graph."""

from __future__ import annotations

import gc
import importlib.util
import os
import weakref

import pytest
import torch

from compress.formats import group_quant, lut, spqr
from compress.formats.quantized import Outliers, QuantizedStatistic, QuantizedWeight
from compress.kernels import extras_view, views

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # chosen when a kernel is defined: before the kernel module is imported


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _statistic(rows: int, groups: int, low: float, high: float, seed: int) -> QuantizedStatistic:
    """Second-level (3-bit, groups of 16 rows or fewer) statistics between low and high."""
    group_size = next(g for g in (16, 11, 3, 1) if rows % g == 0)
    step = ((torch.rand(rows // group_size, groups, generator=_gen(seed)) + 0.5) * (high - low) / 8).half()
    base = (torch.rand(rows // group_size, groups, generator=_gen(seed + 1)) * 0.1 + low).half()
    return QuantizedStatistic(torch.randint(0, 8, (rows, groups), generator=_gen(seed + 2)), 3, group_size, step, base)


def _extras(q: QuantizedWeight, outliers: bool, perm: bool, keep: bool, seed: int) -> QuantizedWeight:
    rows, cols = q.shape
    if outliers:
        where = torch.rand(rows, cols, generator=_gen(seed + 7)) < 0.02
        where[0, -1] = True  # one in the last column; none in the last row
        where[-1] = False
        q.outliers = Outliers.from_mask(torch.randn(rows, cols, generator=_gen(seed + 8)) * 3, where)
    if perm:
        q.perm = torch.randperm(cols, generator=_gen(seed + 9))
    if keep:
        q.keep = torch.rand(rows, cols, generator=_gen(seed + 10)) < 0.6
    return q


def make_lut(rows: int, cols: int, bits: int = 3, outliers: bool = True, perm: bool = True, keep: bool = False, seed: int = 20) -> lut.LUTWeight:
    table = (torch.randn(rows, 2**bits, generator=_gen(seed)) * 0.05).half()
    codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(seed + 1))
    return lut.from_quantized(_extras(QuantizedWeight((rows, cols), bits, cols, codes, None, None, lut=table), outliers, perm, keep, seed))


def make(rows: int, cols: int, bits: int = 3, group_size: int = 16, second_level: bool = True, outliers: bool = True,
         perm: bool = True, keep: bool = False, seed: int = 0) -> spqr.SpQRWeight:
    groups = -(-cols // group_size)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(seed))
    if second_level:
        scale, zero = _statistic(rows, groups, 1e-3, 0.05, seed + 1), _statistic(rows, groups, 0.0, 2**bits - 1, seed + 4)
    else:
        scale = (torch.rand(rows, groups, generator=_gen(seed + 1)) * 0.05 + 1e-3).half()
        zero = (torch.rand(rows, groups, generator=_gen(seed + 2)) * 2**bits).half()
    q = _extras(QuantizedWeight((rows, cols), bits, group_size, codes, scale, zero), outliers, perm, keep, seed)
    return spqr.from_quantized(q)


CASES = {  # (rows, cols, bits, group size, second level, outliers, perm)
    "3b-g16-second-level-outliers-perm": (37, 200, 3, 16, True, True, True),
    "4b-g24-fp16-statistics-perm": (20, 100, 4, 24, False, False, True),
    "2b-g32-outliers": (33, 130, 2, 32, True, True, False),
    "8b-g16-fp16-outliers": (16, 70, 8, 16, False, True, False),
}


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_view_equals_reference(case):
    rows, cols, bits, group_size, second_level, outliers, perm = CASES[case]
    packed = make(rows, cols, bits, group_size, second_level, outliers, perm)
    view = extras_view.build(packed)
    if bits == 3:  # read as 4-bit words by the fast kernels
        assert view.dense.bits == 4 and view.dense.codes.shape[1] == -(-cols // 8)
    else:
        assert view.dense.codes.data_ptr() == packed.codes.data_ptr()  # the code words are shared, not copied
    assert (view.delta is not None) == outliers and (view.perm is not None) == perm
    for batch in (1, 3):
        x = torch.randn(batch, cols, generator=_gen(batch))
        ref = spqr.reference_matmul(x, packed)
        error = _relative_error(extras_view.matmul(x, view, extras_view.reference_dense), ref)
        # float16 statistics are exact; second-level ones are rounded to float16 (a relative 2^-12 on average)
        assert error < (2e-3 if second_level else 1e-5), (batch, error)
        assert error > 0 or not second_level  # the rounding is real: a test that cannot fail would hide it


@pytest.mark.parametrize("zero_kind", ["integer", "float16"])
@pytest.mark.parametrize("cols, group_size", [(1000, 128), (45, 16), (130, 24)])
def test_widened_int3_is_the_same_weight(cols, group_size, zero_kind):
    rows, groups = 7, -(-cols // group_size)
    codes = torch.randint(0, 8, (rows, cols), generator=_gen(1))
    scale = (torch.rand(rows, groups, generator=_gen(2)) * 0.1 + 0.01).half().float()
    zero = torch.randint(0, 8, (rows, groups), generator=_gen(3)).float() if zero_kind == "integer" else \
        (torch.rand(rows, groups, generator=_gen(3)) * 7).half().float()
    packed = group_quant.pack(codes, scale, zero, 3, group_size, zero_kind)
    wide = views.widen(packed)
    assert wide.bits == 4 and wide.zero_kind == zero_kind and wide.scale is packed.scale
    assert torch.equal(group_quant.unpack(wide), group_quant.unpack(packed))
    assert views.kernel_form(packed) is views.kernel_form(packed)  # built once, then looked up
    four = views.widen(packed)
    assert views.kernel_form(four) is four  # other widths are read as stored
    with pytest.raises(ValueError, match="3-bit"):
        views.widen(four)


LUT_CASES = {"3b-outliers-perm": (37, 200, 3, True, True), "4b": (20, 64, 4, False, False), "2b-outliers": (33, 130, 2, True, False),
             "6b-perm": (16, 70, 6, False, True), "8b-outliers-perm": (9, 45, 8, True, True)}


@pytest.mark.parametrize("case", LUT_CASES)
def test_lut_view_equals_reference(case):
    rows, cols, bits, outliers, perm = LUT_CASES[case]
    packed = make_lut(rows, cols, bits, outliers, perm)
    view = extras_view.build(packed)
    assert view.dense.bits == (4 if bits <= 4 else 8) and view.dense.table.shape == (rows, 2**view.dense.bits)
    for batch in (1, 3):
        x = torch.randn(batch, cols, generator=_gen(batch))
        error = _relative_error(extras_view.matmul(x, view, extras_view.reference_dense), lut.reference_matmul(x, packed))
        assert error < 1e-6, (batch, error)  # the table and outliers are exact: only the summation order differs


def test_unsupported_weights_refused():
    with pytest.raises(ValueError, match="keep mask"):
        extras_view.build(make(16, 64, keep=True))
    with pytest.raises(ValueError, match="5-bit"):
        extras_view.build(make(16, 64, bits=5))
    assert not extras_view.supported(make(16, 64, keep=True)) and extras_view.supported(make(16, 64))
    with pytest.raises(ValueError, match="keep mask"):
        extras_view.build(make_lut(16, 64, keep=True))


def test_cached_view_follows_the_codes():
    packed = make(16, 64, bits=4)  # 4-bit codes: the view shares the code tensor it is keyed by
    view = extras_view.cached(packed)
    assert extras_view.cached(packed) is view and view.dense.codes.data_ptr() == packed.codes.data_ptr()
    moved = spqr.SpQRWeight(**{**vars(packed), "codes": packed.codes.clone()})
    assert extras_view.cached(moved) is not view
    gone = weakref.ref(packed.codes)
    del packed, view, moved
    gc.collect()
    assert gone() is None  # the cache keeps neither the weight nor its view alive


TRITON_CASES = {"spqr-3b-g16-second-level-outliers-perm": lambda: make(37, 200, 3, 16, True, True, True),
                "spqr-2b-g32-outliers": lambda: make(33, 130, 2, 32, True, True, False),
                "lut-3b-outliers-perm": lambda: make_lut(37, 200, 3), "lut-4b-odd": lambda: make_lut(9, 45, 4, False, False),
                "lut-8b-outliers": lambda: make_lut(20, 100, 8, True, False)}


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("case", TRITON_CASES)
def test_view_on_triton_kernels(case):
    """The views on the Triton kernels (SpQR: the group-quant kernels; LUT: the split-K GEMV's table mode, up to
    4 activation rows a program: batch 5 takes two batch tiles)."""
    from compress.kernels import triton_kernels as tk
    from compress.kernels import triton_outliers

    packed = TRITON_CASES[case]()
    device = "cuda" if HAS_CUDA else "cpu"
    packed = type(packed)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(packed).items()})
    view = extras_view.build(packed)
    reference = spqr.reference_matmul if isinstance(packed, spqr.SpQRWeight) else lut.reference_matmul
    exact = isinstance(packed, lut.LUTWeight)
    for batch, dtype in ((1, torch.float32), (5, torch.float32), (1, torch.bfloat16)):
        x = torch.randn(batch, packed.shape[1], generator=_gen(batch)).to(device, dtype)
        error = _relative_error(extras_view.matmul(x, view, tk.packed_matmul, triton_outliers.add_corrections), reference(x.float(), packed))
        assert error < ((1e-6 if exact else 2e-3) if dtype == torch.float32 else 1e-2), (batch, dtype, error)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("batch", [1, 5, 16, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outlier_kernel_equals_the_plain_corrections(batch, dtype):
    """One kernel over the row pointers against index_add_: rows with none, one, and more outliers than a step (BLOCK),
    batches past one program's rows, bf16 and fp32; fp32 sums in another order, then one rounding to y's dtype."""
    from compress.kernels import triton_outliers

    device = "cuda" if HAS_CUDA else "cpu"
    packed = make(40, 200, 3, 16, False, True, True, seed=3)
    counts = packed.outlier_row_ptr[1:] - packed.outlier_row_ptr[:-1]
    assert (counts == 0).any() and (counts >= 2).any()  # rows without outliers (the last) and rows with several
    heavy = make(3, 200, 3, 16, False, False, False)  # one row with more outliers than a step
    heavy.outlier_row_ptr = torch.tensor([0, 0, triton_outliers.BLOCK + 7, triton_outliers.BLOCK + 8], dtype=torch.int32)
    heavy.outlier_cols = torch.cat([torch.randperm(200, generator=_gen(4))[: triton_outliers.BLOCK + 7].sort().values, torch.tensor([199])]).short()
    heavy.outlier_values = torch.randn(triton_outliers.BLOCK + 8, generator=_gen(5)).half()
    for weight in (packed, heavy):
        weight = type(weight)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(weight).items()})
        view = extras_view.build(weight)
        stored = torch.randn(batch, 200, generator=_gen(batch)).to(device, dtype)
        y = torch.randn(batch, weight.shape[0], generator=_gen(batch + 1)).to(device, dtype)
        want = extras_view.reference_corrections(y.clone(), stored, view)
        got = triton_outliers.add_corrections(y.clone(), stored, view.row_ptr, view.cols, view.delta)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance), (batch, (got.float() - want.float()).abs().max())
        assert not torch.equal(got, y)  # the corrections are there
        none = weight.outlier_row_ptr[1:] == weight.outlier_row_ptr[:-1]
        assert torch.equal(got[:, none], y[:, none])  # rows without outliers are left as they were


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="no CUDA device")
def test_cuda_module_in_a_graph():
    from compress.kernels import dispatch
    from compress.kernels.modules import from_packed

    packed = make(256, 1024)
    module = from_packed(packed).cuda()
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    assert dispatch.kernel_for(x, module.packed) == "triton"
    assert dispatch.kernel_for(x, from_packed(make(16, 64, keep=True)).cuda().packed) == "torch"
    module(x)  # builds the view, compiles the kernel
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = module(x)
    graph.replay()
    ref = spqr.reference_matmul(x.float(), module.packed)
    assert _relative_error(out, ref) < 1e-2
