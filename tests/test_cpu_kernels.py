"""The CPU kernels (compress.kernels): every path this CPU runs (avx512, avx2, scalar, torch) equals the
format's reference_matmul within fp32 accumulation tolerance on odd shapes, batches 1/3/16 (and 20: two
slices), bf16 and fp32 inputs and edge cases; the modules; the forced path; the build-failure fallback.
The kernels build once (about a minute) into torch's extension cache, later sessions reuse the build."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from compress.formats import bitmap, lut, nm, sparse_quant, spqr
from compress.formats import group_quant as gq
from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight
from compress.kernels import build, cpu, modules
from compress.methods.sparsity import prune_mask

PATHS = ("avx512", "avx2", "scalar", "torch")
SHAPES = [(1, 8), (3, 24), (17, 40), (33, 100), (65, 24), (256, 512)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=PATHS)
def path(request) -> str:
    if request.param == "torch" and any(isinstance(p, int) and p >= 256 for p in request.node.callspec.params.values()):
        pytest.skip("the torch path is the reference itself: checked on the small shapes")
    available = build.cpu_paths()
    if request.param not in available:
        reason = build.unavailable_reason() or f"this CPU lacks {request.param.upper()} (it runs {', '.join(available)})"
        pytest.skip(reason)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=_gen(seed)).bfloat16().float()


def _statistics(rows: int, cols: int, group_size: int, bits: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    groups = -(-cols // group_size)
    scale = (torch.rand(rows, groups, generator=_gen(seed)) * 0.1 + 1e-3).half().float()
    zero = torch.randint(0, 2**bits, (rows, groups), generator=_gen(seed + 1)).float()
    return scale, zero


_REFERENCES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _reference(module, packed, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference_matmul, unpacked weight), once per weight content: every path's test compares with it
    (the reference is a Python loop over rows, the slow part of this file)."""
    digest = hashlib.sha1(repr((packed.meta, batch, dtype)).encode())
    for tensor in vars(packed).values():
        if isinstance(tensor, torch.Tensor):
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    key = digest.hexdigest()
    if key not in _REFERENCES:
        x = torch.randn(batch, packed.shape[1], generator=_gen(batch)).to(dtype)
        _REFERENCES[key] = (module.reference_matmul(x, packed), module.unpack(packed))
    return _REFERENCES[key]


def _check(packed, path: str, batches=(1, 3, 16), dtypes=(torch.float32, torch.bfloat16)) -> None:
    """The kernel against the reference: fp32 sums in a different order (and, for bf16, the output
    rounded from two slightly different fp32 sums: one bf16 step apart at most)."""
    module = {nm.NMWeight: nm, gq.GroupQuantWeight: gq, bitmap.BitmapWeight: bitmap, sparse_quant.SparseQuantWeight: sparse_quant,
              spqr.SpQRWeight: spqr, lut.LUTWeight: lut}[type(packed)]
    cases = [(batch, dtype) for batch in batches for dtype in dtypes]
    if packed.shape[0] * packed.shape[1] >= 2**17:  # the large shape: two cases keep the reference loop short
        cases = [(1, torch.bfloat16), (16, torch.float32)]
    elif path == "torch":  # the torch path is the reference itself: one case shows the dispatch
        cases = cases[:1]
    for batch, dtype in cases:
        x = torch.randn(batch, packed.shape[1], generator=_gen(batch)).to(dtype)
        ref, weight = _reference(module, packed, batch, dtype)
        out = cpu.packed_matmul(x, packed, path)
        assert out.dtype == dtype and out.shape == ref.shape
        bound = 2e-5 * (x.float().abs() @ weight.abs().T) + 1e-30
        if dtype == torch.bfloat16:
            bound = bound + 2**-7 * ref.float().abs()
        wrong = ((out.float() - ref.float()).abs() > bound).nonzero()
        assert not wrong.numel(), f"batch {batch} {dtype} at {wrong[0].tolist()}: {out[tuple(wrong[0])]} vs {ref[tuple(wrong[0])]}"


# -- N:M ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", SHAPES)
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2)])
def test_nm(path, rows, cols, n, m):
    if cols % m:
        pytest.skip(f"{n}:{m} needs the input size to be a multiple of {m}")
    mask = prune_mask(torch.rand(rows, cols, generator=_gen(1)), 1 - n / m, f"{n}:{m}")
    weight = _weight(rows, cols) * mask
    weight[0, : cols // 2] = 0  # kept weights that are exactly zero
    _check(nm.pack(weight, mask, n, m), path)


@pytest.mark.parametrize("n, m, cols", [(2, 4, 100), (8, 16, 512), (5, 16, 48), (2, 3, 24), (7, 8, 40)])
def test_nm_float16_and_other_patterns(path, n, m, cols):
    mask = prune_mask(torch.rand(17, cols, generator=_gen(2)), 1 - n / m, f"{n}:{m}")
    weight = torch.randn(17, cols, generator=_gen(3)).half().float() * mask
    _check(nm.pack(weight, mask, n, m, dtype=torch.float16), path, batches=(1, 16))


# -- group quant ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_group_quant(path, rows, cols, bits):
    for group_size in (128, 32, 24) if rows < 256 else (128, 64):
        codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(bits))
        codes[-1] = 0  # zero codes
        scale, zero = _statistics(rows, cols, group_size, bits)
        _check(gq.pack(codes, scale, zero, bits, group_size), path, batches=(1, 3, 16) if group_size == 128 else (1, 16))


@pytest.mark.parametrize("bits, group_size", [(4, 16), (4, 64), (2, 64), (8, 16), (3, 40)])
def test_group_quant_float16_zero_and_partial_groups(path, bits, group_size):
    rows, cols = 33, 100  # the last group is partial for every group size here
    codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(5))
    scale, _ = _statistics(rows, cols, group_size, bits)
    zero = (torch.rand(scale.shape, generator=_gen(6)) * 2**bits).half().float()
    packed = gq.pack(codes, scale, zero, bits, group_size, zero_kind="float16")
    assert packed.zero_kind == "float16"
    _check(packed, path, batches=(1, 16))


@pytest.mark.parametrize("bits, group_size, pattern", [(4, 128, None), (4, 64, None), (2, 128, None), (8, 128, None), (8, 32, None),
                                                       (4, 128, "2:4"), (4, 64, "2:4"), (4, 128, "4:8")])
def test_bfloat16_code_kernels(path, bits, group_size, pattern):
    """The bfloat16-activation kernels (codes turned into bfloat16 in registers): several groups of whole
    steps, a last group partial with a column tail, batches that take 8 + 1 rows a pass."""
    rows, cols = 19, 712
    codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(14))
    scale, zero = _statistics(rows, cols, group_size, bits)
    zero[0] = 2**bits - 1  # the largest zero point: codes - zero reach -(2^bits - 1)
    if pattern:
        mask = prune_mask(torch.rand(rows, cols, generator=_gen(15)), 0.5, pattern)
        packed = sparse_quant.pack(mask, codes, scale, zero, bits, group_size, pattern=pattern)
    else:
        packed = gq.pack(codes, scale, zero, bits, group_size)
    _check(packed, path, batches=(1, 9), dtypes=(torch.bfloat16,))
    # tighter than _check's one-step bound: fp32 sums in another order round to the same bfloat16 nearly always
    x = torch.randn(9, cols, generator=_gen(9)).bfloat16()
    module = sparse_quant if pattern else gq
    assert (cpu.packed_matmul(x, packed, path) == module.reference_matmul(x, packed)).float().mean() > 0.9


# -- bitmap ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", SHAPES)
@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_bitmap(path, rows, cols, density):
    mask = torch.rand(rows, cols, generator=_gen(7)) < density
    mask[rows // 2] = False  # a row with no kept weight
    _check(bitmap.pack(_weight(rows, cols) * mask, mask), path)


@pytest.mark.parametrize("tile_rows", [1, 3, 16, 64])
def test_bitmap_float16_tiles_and_empty(path, tile_rows):
    rows, cols = 33, 100
    mask = torch.rand(rows, cols, generator=_gen(8)) < 0.3
    mask[:5] = False
    weight = torch.randn(rows, cols, generator=_gen(9)).half().float() * mask
    _check(bitmap.pack(weight, mask, dtype=torch.float16, tile_rows=tile_rows), path, batches=(1, 16))
    empty = torch.zeros(rows, cols)
    packed = bitmap.pack(empty, empty != 0, tile_rows=tile_rows)  # no value at all
    assert torch.equal(cpu.packed_matmul(torch.randn(3, cols), packed, path), torch.zeros(3, rows))
    assert torch.equal(cpu.packed_matmul(torch.randn(3, cols).bfloat16(), packed, path), torch.zeros(3, rows, dtype=torch.bfloat16))


# -- sparse + quant -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", SHAPES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "1:4"])
def test_sparse_quant(path, rows, cols, pattern):
    nm_pattern = sparse_quant.parse_pattern(pattern)
    if nm_pattern and cols % nm_pattern[1]:
        pytest.skip(f"{pattern} needs the input size to be a multiple of {nm_pattern[1]}")
    if nm_pattern:
        mask = prune_mask(torch.rand(rows, cols, generator=_gen(10)), 1 - nm_pattern[0] / nm_pattern[1], pattern)
    else:
        mask = torch.rand(rows, cols, generator=_gen(10)) < 0.4
        mask[0] = False
    for bits, group_size in ((4, 128), (3, 16), (8, 24), (8, 32)) if rows < 256 else ((3, 16), (8, 64)):  # 8-bit, whole words a group: its own kernel
        codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(bits))
        scale, zero = _statistics(rows, cols, group_size, bits)
        _check(sparse_quant.pack(mask, codes, scale, zero, bits, group_size, pattern=pattern), path,
               batches=(1, 3, 16) if bits == 4 else (1, 16))


def test_sparse_quant_float16_zero_and_tiles(path):
    rows, cols = 33, 100
    mask = torch.rand(rows, cols, generator=_gen(11)) < 0.6
    codes = torch.randint(0, 16, (rows, cols), generator=_gen(12))
    scale, _ = _statistics(rows, cols, 32, 4)
    zero = (torch.rand(scale.shape, generator=_gen(13)) * 16).half().float()
    for tile_rows in (1, 5, 16):
        _check(sparse_quant.pack(mask, codes, scale, zero, 4, 32, zero_kind="float16", tile_rows=tile_rows), path, batches=(1, 16))


# -- spqr and lut: second-level statistics, outliers, keep mask, permutation --------------------------------


def _extras(q: QuantizedWeight, keep: bool, outliers: bool, perm: bool, seed: int) -> QuantizedWeight:
    """A keep mask (~55%, row 1 all pruned), outliers (~2%, one in the last column of row 0, none in the
    last row) and a column permutation, as asked."""
    rows, cols = q.shape
    if keep:
        q.keep = torch.rand(rows, cols, generator=_gen(seed)) < 0.55
        q.keep[min(1, rows - 1)] = False
    if outliers:
        where = torch.rand(rows, cols, generator=_gen(seed + 1)) < 0.02
        where[0, -1] = True
        if rows > 1:
            where[-1] = False
        q.outliers = Outliers.from_mask(torch.randn(rows, cols, generator=_gen(seed + 2)) * 3, where)
    if perm:
        q.perm = torch.randperm(cols, generator=_gen(seed + 3))
    return q


def _second_level(rows: int, groups: int, bits: int, low: float, high: float, seed: int) -> QuantizedStatistic:
    group_size = next(g for g in (16, 11, 3, 1) if rows % g == 0)
    outer = (rows // group_size, groups)
    step = ((torch.rand(outer, generator=_gen(seed)) + 0.5) * (high - low) / 2**bits).half()
    base = (torch.rand(outer, generator=_gen(seed + 1)) * 0.1 + low).half()
    codes = torch.randint(0, 2**bits, (rows, groups), generator=_gen(seed + 2))
    return QuantizedStatistic(codes, bits, group_size, step, base)


def _spqr_weight(rows: int, cols: int, bits: int, group_size: int, second_level: bool = True, zero_kind: str = "float16", keep: bool = False,
                 outliers: bool = True, perm: bool = True, seed: int = 30) -> QuantizedWeight:
    groups = -(-cols // group_size)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(seed))
    if second_level:
        scale, zero = _second_level(rows, groups, 3, 1e-3, 0.05, seed + 1), _second_level(rows, groups, 3, 0.0, 2**bits - 1, seed + 4)
    else:
        scale, zero = _statistics(rows, cols, group_size, bits, seed + 1)
        if zero_kind == "float16":
            zero = (torch.rand(scale.shape, generator=_gen(seed + 2)) * 2**bits).half()
    q = QuantizedWeight((rows, cols), bits, group_size, codes, scale, zero)
    return _extras(q, keep, outliers, perm, seed + 10)


def _lut_weight(rows: int, cols: int, bits: int, keep: bool = False, outliers: bool = True, perm: bool = True, seed: int = 40) -> QuantizedWeight:
    table = (torch.randn(rows, 2**bits, generator=_gen(seed)) * 0.05).half()
    codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(seed + 1))
    return _extras(QuantizedWeight((rows, cols), bits, cols, codes, None, None, lut=table), keep, outliers, perm, seed + 10)


SPQR_CASES = {  # bits, group size, second level, zero kind, keep, outliers, perm
    "3b-g16-qq3-outliers-perm": (3, 16, True, "float16", False, True, True),
    "3b-g16-qq3-keep": (3, 16, True, "float16", True, True, True),
    "4b-g24-fp16-noout": (4, 24, False, "float16", False, False, True),
    "2b-g32-intzero-keep": (2, 32, False, "integer", True, True, False),
    "8b-g16-qq3": (8, 16, True, "float16", False, True, False),
    "5b-g40-keep": (5, 40, True, "float16", True, True, True),
}
LUT_CASES = {  # bits, keep, outliers, perm
    "3b-outliers-perm": (3, False, True, True),
    "4b-keep": (4, True, True, True),
    "2b-noout": (2, False, False, False),
    "6b-keep": (6, True, True, False),
    "8b": (8, False, True, True),
}


@pytest.mark.parametrize("rows, cols", SHAPES + [(7, 45), (33, 130)])
@pytest.mark.parametrize("case", SPQR_CASES)
def test_spqr(path, rows, cols, case):
    bits, group_size, second_level, zero_kind, keep, outliers, perm = SPQR_CASES[case]
    if rows * cols >= 2**17 and case not in ("3b-g16-qq3-outliers-perm", "3b-g16-qq3-keep"):
        pytest.skip("the large shape: the common configurations only")
    packed = spqr.from_quantized(_spqr_weight(rows, cols, bits, group_size, second_level, zero_kind, keep, outliers, perm))
    assert (packed.bitmask is not None) == keep and packed.zero_kind == ("quantized" if second_level else zero_kind)
    _check(packed, path, batches=(1, 3, 16) if case.startswith("3b") else (1, 16))


@pytest.mark.parametrize("rows, cols", SHAPES + [(7, 45), (33, 130)])
@pytest.mark.parametrize("case", LUT_CASES)
def test_lut(path, rows, cols, case):
    bits, keep, outliers, perm = LUT_CASES[case]
    if rows * cols >= 2**17 and case not in ("3b-outliers-perm", "4b-keep"):
        pytest.skip("the large shape: the common configurations only")
    packed = lut.from_quantized(_lut_weight(rows, cols, bits, keep, outliers, perm))
    _check(packed, path, batches=(1, 3, 16) if bits == 3 else (1, 16))


@pytest.mark.parametrize("fmt", ["spqr", "lut"])
def test_spqr_lut_edges(path, fmt):
    """No outliers at all, every row pruned, float16 activations, tiles of 3 rows, a 20-row batch (two slices)."""
    rows, cols = 17, 70
    make = (lambda **kw: spqr.from_quantized(_spqr_weight(rows, cols, 3, 16, **kw), tile_rows=3)) if fmt == "spqr" else \
        (lambda **kw: lut.from_quantized(_lut_weight(rows, cols, 3, **kw), tile_rows=3))
    _check(make(outliers=False, perm=False), path, batches=(1, 20), dtypes=(torch.float32, torch.float16))
    _check(make(keep=True), path, batches=(1, 16), dtypes=(torch.float16,))
    empty = make(keep=True, outliers=False)
    empty.bitmask.zero_()
    empty.codes = empty.codes[:0]
    empty.code_offsets.zero_()
    assert torch.equal(cpu.packed_matmul(torch.randn(3, cols), empty, path), torch.zeros(3, rows))


# -- K-blocked passes (4+ activation rows whose x does not fit L1), row blocks of 32 and a remainder --


@pytest.mark.parametrize("fmt", ["2:4", "4:8", "1:4", "int4", "int2", "int8", "bitmap", "bitmap-tile3"])
def test_k_blocked(path, fmt):
    rows, cols = 40, 2048
    if fmt.startswith("bitmap"):
        mask = torch.rand(rows, cols, generator=_gen(24)) < 0.4
        mask[33] = False
        packed = bitmap.pack(_weight(rows, cols) * mask, mask, tile_rows=3 if fmt.endswith("3") else 16)
    elif ":" in fmt:
        n, m = map(int, fmt.split(":"))
        mask = prune_mask(torch.rand(rows, cols, generator=_gen(22)), 1 - n / m, fmt)
        packed = nm.pack(_weight(rows, cols) * mask, mask, n, m)
    else:
        bits = int(fmt[3:])
        scale, zero = _statistics(rows, cols, 64, bits)
        packed = gq.pack(torch.randint(0, 2**bits, (rows, cols), generator=_gen(23)), scale, zero, bits, 64)
    _check(packed, path, batches=(4, 5, 16) if path != "torch" else (4,))


# -- batches past one slice, leading dimensions, zeros -------------------------------------------------


def test_large_batch_leading_dims_and_zero_input(path):
    mask = prune_mask(torch.rand(17, 40, generator=_gen(14)), 0.5, "2:4")
    packed = nm.pack(_weight(17, 40) * mask, mask, 2, 4)
    _check(packed, path, batches=(20, 33))
    x = torch.randn(2, 3, 40, generator=_gen(15))
    assert torch.equal(cpu.packed_matmul(x, packed, path), cpu.packed_matmul(x.reshape(6, 40), packed, path).reshape(2, 3, 17))
    assert torch.equal(cpu.packed_matmul(torch.zeros(4, 40), packed, path), torch.zeros(4, 17))
    assert cpu.packed_matmul(torch.zeros(0, 40), packed, path).shape == (0, 17)
    with pytest.raises(ValueError, match="features"):
        cpu.packed_matmul(torch.zeros(1, 41), packed, path)


# -- modules --------------------------------------------------------------------------------------------


def _all_formats(rows: int = 33, cols: int = 64) -> list:
    mask24 = prune_mask(torch.rand(rows, cols, generator=_gen(16)), 0.5, "2:4")
    mask = torch.rand(rows, cols, generator=_gen(17)) < 0.3
    codes = torch.randint(0, 16, (rows, cols), generator=_gen(18))
    scale, zero = _statistics(rows, cols, 32, 4)
    return [nm.pack(_weight(rows, cols) * mask24, mask24, 2, 4), gq.pack(codes, scale, zero, 4, 32), bitmap.pack(_weight(rows, cols) * mask, mask),
            sparse_quant.pack(mask24, codes, scale, zero, 4, 32, pattern="2:4"), sparse_quant.pack(mask, codes, scale, zero, 4, 32),
            spqr.from_quantized(_spqr_weight(rows, cols, 3, 16, keep=True)), lut.from_quantized(_lut_weight(rows, cols, 3, keep=True))]


@pytest.mark.parametrize("index", range(7))
def test_modules_forward_equals_reference(index):
    packed = _all_formats()[index]
    bias = torch.randn(packed.shape[0], generator=_gen(19))
    layer = modules.from_packed(packed, bias)
    assert isinstance(layer, modules.MODULES[type(packed)])
    assert set(layer.state_dict()) == {name for name, t in vars(packed).items() if isinstance(t, torch.Tensor)} | {"bias"}
    assert not list(layer.parameters())
    x = torch.randn(2, 3, packed.shape[1], generator=_gen(20))
    expected = cpu.reference_matmul(x, packed) + bias
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    # a dtype cast leaves the packed tensors as stored (the format's dtypes), the bias follows
    layer16 = modules.from_packed(packed, bias).to(torch.bfloat16)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(vars(layer16.packed).values(), vars(packed).values())
               if isinstance(a, torch.Tensor))
    assert layer16.bias.dtype == torch.bfloat16
    assert "in_features" in repr(layer) and type(layer).from_packed(packed).bias is None
    with pytest.raises(TypeError, match="NMWeight"):
        modules.NMLinear(_all_formats()[1])


def test_other_devices_take_the_reference():
    assert cpu._path(torch.empty(1, 8, device="meta"), None) == "torch"
    assert cpu._path(torch.empty(1, 8, dtype=torch.float64), None) == "torch"


# -- the path: forced by the environment, refused when unknown ------------------------------------------


def test_environment_forces_the_path(path, monkeypatch):
    packed = _all_formats()[0]
    x = torch.randn(3, packed.shape[1], generator=_gen(21))
    monkeypatch.setenv("COMPRESS_CPU_KERNEL", path)
    assert build.resolve_path() == path
    assert torch.equal(cpu.packed_matmul(x, packed), cpu.packed_matmul(x, packed, path))
    monkeypatch.setenv("COMPRESS_CPU_KERNEL", "avx1024")
    with pytest.raises(ValueError, match="avx1024"):
        cpu.packed_matmul(x, packed)


def test_features_named():
    assert build.cpu_features()
    assert build.cpu_paths()[-1] == "torch"


# -- the build-failure fallback (a fresh process each: the ops register once per process) -----------------

FALLBACK = textwrap.dedent("""
    import torch
    from compress.formats import nm
    from compress.kernels import build, cpu
    mask = torch.tensor([[True, False, True, False] * 4] * 3)
    packed = nm.pack(torch.randn(3, 16).bfloat16().float() * mask, mask, 2, 4)
    x = torch.randn(2, 16)
    assert torch.equal(cpu.packed_matmul(x, packed), nm.reference_matmul(x, packed))
    assert build.cpu_paths() == ["torch"] and build.resolve_path() == "torch"
    try:
        build.resolve_path("avx2")
    except RuntimeError as error:
        print("refused:", error)
    print("fallback ok")
""")


def _run_fallback(tmp_path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": ROOT, **env}
    environ.pop("COMPRESS_CPU_KERNEL", None)
    return subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=environ, cwd=ROOT, timeout=300)


def test_broken_source_falls_back_with_one_line(tmp_path):
    sources = tmp_path / "broken"
    sources.mkdir()
    (sources / "ops.cpp").write_text("this is not C++;\n")
    result = _run_fallback(tmp_path, COMPRESS_KERNEL_SOURCES=str(sources))
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout and "refused:" in result.stdout
    notices = [line for line in result.stderr.splitlines() if "compress CPU kernels unavailable" in line]
    assert len(notices) == 1 and "build failed" in notices[0] and "plain-torch reference" in notices[0], result.stderr


def test_missing_compiler_falls_back_with_one_line(tmp_path):
    result = _run_fallback(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"compress CPU kernels unavailable (no C++ compiler ({str(tmp_path / 'no-such-compiler')!r} not found)); "
                     "using the plain-torch reference matmul"], result.stderr


def test_spqr_lut_fall_back_to_the_reference_without_the_op(monkeypatch):
    """A build from sources older than these formats has no op: the wrappers (and modules) use the reference."""
    monkeypatch.setattr(cpu, "_op", lambda name: None)
    for packed in _all_formats()[5:]:
        x = torch.randn(2, packed.shape[1], generator=_gen(25))
        assert torch.equal(cpu.packed_matmul(x, packed), cpu.reference_matmul(x, packed))
        assert torch.equal(modules.from_packed(packed)(x), cpu.reference_matmul(x, packed))
