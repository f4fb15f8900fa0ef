"""The tensor-core kernel for bitmap (unstructured sparse) weights (compress.kernels.cuda_mma_bitmap) and its re-packed
layout (mma_bitmap_layout): on CPU the layout, read with the kernel's index arithmetic, equals the weight rounded to
the activations' dtype, and the shapes it refuses; on a GPU the kernel against x @ that weight.T."""

import pytest
import torch
from conftest import graph_replay, on_device

from compress.formats import bitmap
from compress.kernels import cuda_mma, cuda_mma_bitmap, mma_bitmap_layout

CUDA = torch.cuda.is_available() and cuda_mma.available()


def make_bitmap(rows: int, cols: int, sparsity: float, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> bitmap.BitmapWeight:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols, generator=generator) >= sparsity
    weight = torch.randn(rows, cols, generator=generator).to(dtype).float() * keep
    return bitmap.pack(weight, keep, dtype)


@pytest.mark.parametrize(("rows", "cols", "sparsity"), [(37, 256, 0.7), (16, 128, 0.0), (5, 384, 1.0), (64, 512, 0.5), (33, 128, 0.95)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layout_decodes_to_the_weight(rows, cols, sparsity, dtype):
    packed = make_bitmap(rows, cols, sparsity, seed=rows)
    view = mma_bitmap_layout.pack(packed, dtype)
    assert torch.equal(mma_bitmap_layout.dense(view), bitmap.unpack(packed).to(dtype).float())
    assert view.values.numel() == packed.values.numel() + 8  # every kept value once, then the zeros past the end
    assert view.tiles % mma_bitmap_layout.padded_tiles(1) == 0 and view.tiles * 16 >= rows


def test_a_full_k_tile_and_runs_that_start_past_a_byte():
    # all 256 weights of every k-tile kept: each lane's run starts at 8 x its lane (up to 248, the most a byte of the
    # kernel's scan holds) and a k-tile's 256 values follow the previous one's; the padding tile keeps nothing
    packed = make_bitmap(16, 128, 0.0, seed=3)
    view = mma_bitmap_layout.pack(packed, torch.bfloat16)
    assert view.starts.flatten().tolist() == [256 * j for j in range(8)] + [2048] * 8
    assert torch.equal(mma_bitmap_layout.dense(view), bitmap.unpack(packed).bfloat16().float())


@pytest.mark.parametrize(("cols", "dtype", "ok"), [(256, torch.bfloat16, True), (200, torch.bfloat16, False), (256, torch.float32, False)])
def test_shapes_it_takes(cols, dtype, ok):
    packed = make_bitmap(4, cols, 0.5)
    assert mma_bitmap_layout.shape_ok(packed) is (cols % 128 == 0)
    assert not cuda_mma_bitmap.supported(torch.randn(1, cols, dtype=torch.bfloat16), packed)  # CPU input
    if not ok:
        with pytest.raises(ValueError, match="not a layout the tensor-core bitmap kernel reads"):
            mma_bitmap_layout.pack(packed, dtype)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "sparsity"), [(37, 1024, 0.7), (300, 4096, 0.5), (70, 512, 0.0), (1, 128, 0.9), (48, 256, 1.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_equals_its_weight(rows, cols, sparsity, dtype):
    packed = on_device(make_bitmap(rows, cols, sparsity, seed=rows + cols), "cuda")
    weight = bitmap.unpack(packed).to(dtype).double()
    generator = torch.Generator(device="cuda").manual_seed(rows)
    for batch in (1, 3, 8, 9, 16):
        x = torch.randn(batch, cols, device="cuda", dtype=dtype, generator=generator)
        assert cuda_mma_bitmap.supported(x, packed)
        ref = x.double() @ weight.T
        scale = (x.double().abs() @ weight.abs().T).norm().clamp_min(1e-30)  # fp32 sums, one rounding to the dtype
        for row_tiles, warps, prefetch, pairs in ((1, 1, 0, False), (2, 4, 1, False), (2, 8, 2, True), (1, 8, 1, True), (2, 2, 1, True)):
            if warps > cols // 128:
                continue
            got = cuda_mma_bitmap.matmul(x, packed, row_tiles, warps, prefetch, pairs).double()
            assert ((got - ref).norm() / scale).item() < 2e-3, (batch, row_tiles, warps, prefetch, pairs)
            if sparsity == 1.0:
                assert not got.any()


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_cuda_graph_capture_through_the_dispatcher():
    from compress.kernels import dispatch

    packed = on_device(make_bitmap(512, 4096, 0.7, seed=1), "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = cuda_mma_bitmap.matmul(x, packed)
    assert torch.equal(dispatch.device_matmul(x, packed), eager)  # the dispatcher sends bitmap weights here
    assert torch.equal(graph_replay(lambda: dispatch.device_matmul(x, packed)), eager)


def _prmt(a: int, b: int, select: int) -> int:
    """PTX prmt.b32 (default mode) on Python ints: result byte i is byte (select >> 4i) & 7 of b:a, sign-replicated
    where bit 3 of that nibble is set."""
    source = a | b << 32
    out = 0
    for i in range(4):
        nibble = (select >> (4 * i)) & 0xF
        byte = (source >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def test_pair_decode_selectors_place_each_kept_value():
    # the kernel's take_pair, replayed: for every two keep bits f and run values v0, v1 it must give the A register
    # (low half: the first weight, high half: the second) and move past the values it took
    v0, v1 = 0xBEEF, 0x1234
    want = {0: (0, 0), 1: (v0, 0), 2: (0, v0), 3: (v0, v1)}
    for f, (lo, hi) in want.items():
        select = _prmt(0x22102222, 0x54101022, 0x10 + 0x22 * f)
        assert _prmt(v0, v1, select) == lo | hi << 16, f
        assert (f + 1) >> 1 == bin(f).count("1")  # the pointer moves past the values taken
