"""The ternary_dict kernels (QMoE's dictionary-coded ternary weights) against the format's reference_matmul:
every CPU path this machine runs (avx512, avx2, scalar, torch; forced through COMPRESS_CPU_KERNEL) and the
Triton kernel (compiled on a GPU, else under TRITON_INTERPRET=1 on CPU tensors) on odd shapes, edge rows
(all zero, all max, a last code over the odd width's padding, even a padding weight that is not zero),
batches 1 / 3 / 17, float32 and bfloat16; a smaller dictionary; bad inputs refused; the module's
state_dict round trip and forward. The CPU kernels build once into torch's extension cache."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch

from compress.formats import ternary_dict as td
from compress.formats import tunstall
from compress.kernels import build, cpu, cuda_ternary, dispatch, modules

PATHS = ("avx512", "avx2", "scalar", "torch")
SHAPES = [(1, 1), (3, 7), (17, 130), (17, 131), (64, 257), (300, 2048)]
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernel's (the interpreter runs CPU tensors)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed: the GPU kernel cannot be tested")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    available = build.cpu_paths()
    if request.param not in available:
        pytest.skip(build.unavailable_reason() or f"this CPU lacks {request.param.upper()} (it runs {', '.join(available)})")
    monkeypatch.setenv("COMPRESS_CPU_KERNEL", request.param)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symbols(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """~88% zeros, 6% min, 6% max; row 0 all zero, row 1 all max, row 2 a max in its last column."""
    u = torch.rand(rows, cols, generator=_gen(seed))
    symbols = torch.where(u < 0.88, 0, torch.where(u < 0.94, 1, 2))
    if rows >= 3:
        symbols[0], symbols[1], symbols[2, -1] = 0, 2, 2
    return symbols


def _minmax(rows: int, seed: int = 1) -> torch.Tensor:
    g = _gen(seed)
    return torch.stack([-(torch.rand(rows, generator=g) + 0.1), torch.rand(rows, generator=g) + 0.1], 1).half()


_PACKED: dict[tuple, td.TernaryDictWeight] = {}


def _packed(rows: int, cols: int, dictionary: str = "static") -> td.TernaryDictWeight:
    key = (rows, cols, dictionary)
    if key not in _PACKED:
        _PACKED[key] = td.from_ternary(_symbols(rows, cols), _minmax(rows), dictionary)
    return _PACKED[key]


def _padded_with_max(rows: int, cols: int) -> td.TernaryDictWeight:
    """An odd width whose padding weight is max (the format pads with 0): every kernel must ignore it."""
    assert cols % 2
    weights = torch.nn.functional.pad(_symbols(rows, cols, seed=5), (0, 1), value=2)
    codes, offsets = tunstall.encode(weights[:, 0::2] + 3 * weights[:, 1::2], td.make_dictionary("static", None))
    return td.TernaryDictWeight((rows, cols), codes, offsets, _minmax(rows, seed=6), None, "static")


def _small_dictionary(rows: int = 17, cols: int = 131, count: int = 4096) -> td.TernaryDictWeight:
    dictionary = td.make_dictionary("static", None, count)
    codes, offsets = tunstall.encode(tunstall.to_pairs(_symbols(rows, cols, seed=7)), dictionary)
    return td.TernaryDictWeight((rows, cols), codes, offsets, _minmax(rows, seed=8), None, "static", codewords=count)


def _to(packed: td.TernaryDictWeight, device: str) -> td.TernaryDictWeight:
    tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(packed).items()}
    return td.TernaryDictWeight(**tensors)


def _check(run, packed: td.TernaryDictWeight, batches=(1, 3, 17), dtypes=(torch.float32, torch.bfloat16), device: str = "cpu") -> None:
    """run(x, packed) against the reference: fp32 sums in another order (bf16: the output rounded from two
    slightly different fp32 sums, one bf16 step apart at most)."""
    weight = td.unpack(packed)
    on_device = _to(packed, device)
    for batch in batches:
        for dtype in dtypes:
            x = torch.randn(batch, packed.shape[1], generator=_gen(batch)).to(dtype)
            ref = td.reference_matmul(x, packed)
            out = run(x.to(device), on_device).cpu()
            assert out.dtype == dtype and out.shape == ref.shape
            bound = 2e-5 * (x.float().abs() @ weight.abs().T) + 1e-30
            if dtype != torch.float32:
                bound = bound + 2**-7 * ref.float().abs()
            wrong = ((out.float() - ref.float()).abs() > bound).nonzero()
            assert not wrong.numel(), f"batch {batch} {dtype} at {wrong[0].tolist()}: {out[tuple(wrong[0])]} vs {ref[tuple(wrong[0])]}"


def test_odd_widths_end_in_a_code_over_the_padding():
    packed = _packed(17, 131)
    lengths = td.dictionary_of(packed).kernel_table[:, 2].to(torch.int64)[packed.codes.to(torch.int64) & 0xFFFF]
    per_row = torch.segment_reduce(lengths.float(), "sum", offsets=packed.row_offsets.to(torch.int64))
    assert torch.equal(per_row, torch.full((17,), 132.0))
    assert (td.unpack(packed)[1] == packed.minmax[1, 1].float()).all() and (td.unpack(packed)[0] == 0).all()


# -- CPU ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_cpu(path, rows, cols):
    assert build.resolve_path() == path
    batches, dtypes = ((1, 17), (torch.float32,)) if path == "torch" else ((1, 3, 17), (torch.float32, torch.bfloat16))
    _check(cpu.ternary_dict_matmul, _packed(rows, cols), batches, dtypes)


def test_cpu_adaptive_float16_padding_and_leading_dims(path):
    _check(cpu.packed_matmul, _packed(33, 45, "adaptive"), batches=(2, 9), dtypes=(torch.float16,))
    _check(cpu.packed_matmul, _padded_with_max(5, 33), batches=(1, 4))
    packed = _packed(17, 130)
    x = torch.randn(2, 3, 130, generator=_gen(3))
    assert torch.equal(cpu.ternary_dict_matmul(x, packed), cpu.ternary_dict_matmul(x.reshape(6, 130), packed).reshape(2, 3, 17))
    assert cpu.ternary_dict_matmul(torch.zeros(0, 130), packed).shape == (0, 17)
    with pytest.raises(ValueError, match="features"):
        cpu.ternary_dict_matmul(torch.zeros(1, 129), packed)


def test_cpu_smaller_dictionary_and_bad_inputs(path):
    small = _small_dictionary()
    _check(cpu.ternary_dict_matmul, small, batches=(1, 5))
    if path == "torch":
        return
    x = torch.randn(2, small.shape[1], generator=_gen(9))
    bad = td.TernaryDictWeight(small.shape, small.codes.clone(), small.row_offsets, small.minmax, None, "static", codewords=4096)
    bad.codes[3] = 5000
    with pytest.raises(RuntimeError, match="outside the dictionary"):
        cpu.ternary_dict_matmul(x, bad)
    backwards = td.TernaryDictWeight(small.shape, small.codes, small.row_offsets.flip(0).contiguous(), small.minmax, None, "static")
    with pytest.raises(RuntimeError, match="row_offsets"):
        cpu.ternary_dict_matmul(x, backwards)


# -- Triton ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("rows, cols", SHAPES[:5])
def test_triton(rows, cols):
    from compress.kernels import triton_ternary

    _check(triton_ternary.ternary_dict_matmul, _packed(rows, cols), (1, 3, 17) if rows * cols < 10000 else (1,), device=DEVICE)


@needs_triton
def test_triton_small_tiles():
    """4 rows a program (a partial last block) and 4 codes a step (several chunks, the carry between them)."""
    from compress.kernels import triton_ternary

    def run(x, packed):
        return triton_ternary.ternary_dict_matmul(x, packed, block_rows=4, chunk=4)

    _check(run, _packed(17, 131), (1, 17), (torch.float32,), device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        triton_ternary.ternary_dict_matmul(torch.zeros(1, 131), _packed(17, 131), chunk=6)


@needs_triton
def test_triton_edges():
    from compress.kernels import triton_ternary

    _check(triton_ternary.ternary_dict_matmul, _padded_with_max(5, 33), batches=(1, 4), device=DEVICE)
    _check(triton_ternary.ternary_dict_matmul, _small_dictionary(), batches=(2,), dtypes=(torch.float16,), device=DEVICE)
    _check(triton_ternary.ternary_dict_matmul, _packed(300, 2048), batches=(1,), dtypes=(torch.bfloat16,), device=DEVICE)
    bad = _to(_small_dictionary(), DEVICE)
    bad.codes = bad.codes.clone()
    bad.codes[0] = 5000
    with pytest.raises(ValueError, match="outside the dictionary"):
        triton_ternary.ternary_dict_matmul(torch.randn(1, 131, device=DEVICE), bad)
    with pytest.raises(TypeError, match="float32"):
        triton_ternary.ternary_dict_matmul(torch.randn(1, 131, device=DEVICE).double(), bad)
    assert triton_ternary.ternary_dict_matmul(torch.zeros(0, 131, device=DEVICE), _to(_small_dictionary(), DEVICE)).shape == (0, 17)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and Triton")
def test_cuda_dispatch_and_module():
    packed = _packed(64, 257, "adaptive")
    assert dispatch.kernel_for(torch.zeros(1, 257, device="cuda"), packed) == "triton"
    _check(cpu.packed_matmul, packed, batches=(1, 17), device="cuda")
    layer = modules.from_packed(packed).cuda()
    assert layer.kernel_table.is_cuda
    x = torch.randn(3, 257, generator=_gen(11))
    assert torch.allclose(layer(x.cuda()).cpu(), td.reference_matmul(x, packed), rtol=1e-5, atol=1e-5)



# -- the CUDA kernel (batch 1, dictionary and x in shared memory) --------------------------------------


def test_cuda_kernel_dictionary_entries_round_trip():
    """The entries the CUDA kernel reads hold every codeword of the static, an adaptive and a smaller dictionary
    exactly, except those of more than 3 nonzero weights: flagged, their masks left to the kernel table."""
    lanes = torch.arange(32)
    flagged = 0
    for packed in (_packed(3, 7), _packed(64, 257, "adaptive"), _small_dictionary()):
        table = td.dictionary_of(packed).kernel_table
        entries = cuda_ternary.packed_entries(table)
        assert entries.shape == (len(table),) and int(entries.max()) < 2**23
        unpacked = cuda_ternary.unpack_entries(entries)
        overflow = ((((table[:, :1] | table[:, 1:2]).long()) >> lanes) & 1).sum(1) > 3
        assert torch.equal(unpacked[:, 3].bool(), overflow) and torch.equal(unpacked[:, 2], table[:, 2])
        assert torch.equal(unpacked[~overflow, :2], table[~overflow, :2]) and not unpacked[overflow, :2].any()
        flagged += int(overflow.sum())
    assert flagged > 0  # the adaptive dictionary of 64 x 257 holds codewords of 4 and 5 nonzero weights


needs_cuda_kernel = pytest.mark.skipif(not cuda_ternary.available(), reason="needs CUDA and NVRTC")


@needs_cuda_kernel
def test_cuda_kernel():
    for packed in (_packed(1, 1), _packed(17, 131, "adaptive"), _packed(64, 257, "adaptive"), _packed(300, 2048), _padded_with_max(33, 129),
                   _small_dictionary()):  # 64 x 257 adaptive: codewords of 4 and 5 nonzero weights (read from the kernel table)
        for warps, per_lane in ((1, 1), (8, 2), (32, 4), (4, 8)):
            _check(lambda x, p, w=warps, c=per_lane: cuda_ternary.ternary_matmul(x, p, w, c), packed, batches=(1,),
                   dtypes=(torch.bfloat16, torch.float16), device="cuda")
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    packed = _to(_packed(300, 2048), "cuda")
    assert cuda_ternary.supported(x, packed) and not cuda_ternary.supported(x.float(), packed)
    assert not cuda_ternary.supported(torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16), packed)
    with pytest.raises(ValueError, match="per_lane"):
        cuda_ternary.ternary_matmul(x, packed, per_lane=3)
    expected = cuda_ternary.ternary_matmul(x, packed)
    graph, static_x = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(graph):
        out = cuda_ternary.ternary_matmul(static_x, packed)
    static_x.copy_(x)
    graph.replay()
    assert torch.equal(out, expected)


@needs_cuda_kernel
def test_cuda_dispatch_takes_the_cuda_kernel_at_batch_1(monkeypatch):
    packed = _to(_packed(300, 2048), "cuda")  # 2048 columns at 88% zeros: about 80 codes a row
    calls = []
    original = cuda_ternary.ternary_matmul
    monkeypatch.setattr(cuda_ternary, "ternary_matmul", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(dispatch.device_matmul(x, packed), original(x, packed)) and calls == [1]
    dispatch.device_matmul(torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16), packed)  # batch 4: Triton
    dispatch.device_matmul(torch.randn(1, 131, device="cuda", dtype=torch.bfloat16), _to(_packed(17, 131), "cuda"))  # short rows: Triton
    monkeypatch.setenv("COMPRESS_GPU_KERNEL", "triton")
    dispatch.device_matmul(x, packed)
    assert calls == [1]

# -- the module -----------------------------------------------------------------------------------------


def test_module_forward_and_state_dict_round_trip():
    packed = _packed(17, 131, "adaptive")
    bias = torch.randn(17, generator=_gen(12))
    layer = modules.from_packed(packed, bias)
    assert isinstance(layer, modules.TernaryDictLinear) and not list(layer.parameters())
    assert set(layer.state_dict()) == {"codes", "row_offsets", "minmax", "symbol_counts", "bias"}  # no kernel table
    assert torch.equal(layer.kernel_table, td.dictionary_of(packed).kernel_table)
    x = torch.randn(2, 3, 131, generator=_gen(13))
    expected = td.reference_matmul(x, packed) + bias
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    # another dictionary (other symbol counts) until the state_dict arrives: the kernel table follows the load
    on_meta = td.from_tensors({k: v.to("meta") for k, v in td.to_tensors(packed, "p").items()}, "p", packed.meta)
    assert modules.TernaryDictLinear(on_meta).kernel_table is None  # as transformers builds it: the table comes at the first call
    blank = td.TernaryDictWeight(packed.shape, torch.zeros_like(packed.codes), torch.zeros_like(packed.row_offsets),
                                 torch.zeros_like(packed.minmax), torch.ones(9, dtype=torch.int64), "adaptive")
    other = modules.TernaryDictLinear(blank, torch.zeros(17))
    assert not torch.equal(other.kernel_table, layer.kernel_table)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    assert other.kernel_table is None  # rebuilt from the loaded symbol counts at the next call
    assert torch.equal(other(x), layer(x)) and torch.equal(other.kernel_table, layer.kernel_table)
    # a dtype cast leaves the format's tensors (and the table) as stored, the bias follows
    half = modules.from_packed(packed, bias).to(torch.bfloat16)
    assert half.codes.dtype == torch.int16 and half.kernel_table.dtype == torch.int32 and half.bias.dtype == torch.bfloat16
    static = modules.from_packed(_packed(3, 7))
    assert "symbol_counts" not in static.state_dict() and static.bias is None
