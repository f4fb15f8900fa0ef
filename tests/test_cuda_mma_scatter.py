"""The shared-memory scatter kernel for bitmap weights (compress.kernels.cuda_mma_scatter) and its layout
(mma_scatter_layout): on CPU the layout, read back with the kernel's chunk and place arithmetic, equals the weight
rounded to the activations' dtype, chunks never straddle k-tiles and the places are the ldmatrix tile's; on a GPU the
kernel against x @ that weight.T, in and out of a CUDA graph."""

import pytest
import torch
from conftest import graph_replay, on_device
from test_cuda_mma_bitmap import make_bitmap

from compress.formats import bitmap
from compress.kernels import cuda_mma, cuda_mma_scatter, mma_scatter_layout

CUDA = torch.cuda.is_available() and cuda_mma.available()


@pytest.mark.parametrize(("rows", "cols", "sparsity"), [(37, 256, 0.7), (16, 128, 0.0), (5, 384, 1.0), (64, 512, 0.5), (33, 128, 0.95)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layout_decodes_to_the_weight(rows, cols, sparsity, dtype):
    packed = make_bitmap(rows, cols, sparsity, seed=rows)
    view = mma_scatter_layout.pack(packed, dtype)
    assert torch.equal(mma_scatter_layout.dense(view), bitmap.unpack(packed).to(dtype).float())
    assert view.tiles % mma_scatter_layout.padded_tiles(1) == 0 and view.tiles * 16 >= rows
    # every kept value once, each k-tile's run padded to whole chunks of 8 (fewer than 8 more a k-tile)
    kept, ktiles = packed.values.numel(), view.tiles * (cols // 128) * 8
    assert kept <= view.values.numel() < kept + 8 * ktiles
    assert 1 <= view.rounds <= 8


def test_chunk_bounds_and_places_of_a_full_unit():
    # every weight kept: each k-tile is 32 chunks (b_k = 32 k), its places 0..255 in order; the padding tile keeps nothing
    packed = make_bitmap(16, 128, 0.0, seed=3)
    view = mma_scatter_layout.pack(packed, torch.bfloat16)
    meta = view.meta.long() & 0xFFFFFFFF
    bounds = [int(meta[0, 0, 2 + k // 4] >> (8 * (k % 4)) & 0xFF) for k in range(8)]
    assert bounds == [32 * k for k in range(8)] and meta[0, 0, :2].tolist() == [0, 256] and meta[1, 0, 1] == 0
    assert view.places.view(8, 256).tolist() == [list(range(256))] * 8 and view.rounds == 8


def test_places_are_the_ldmatrix_tile():
    # place (qh * 16 + R) * 8 + 2 t + h of k-tile j is row R, column t * 32 + 4 j + 2 qh + h: lane l's ldmatrix row
    # address (slot 8 l) starts row l % 16's 8 k-values 8 (l // 16) .. + 7, and those k-values' columns are the ones
    # the activations' B fragment gives them (k = 2 t + 8 qh + h)
    weight = torch.arange(16 * 128, dtype=torch.float32).view(16, 128)
    slots = mma_scatter_layout._by_place(weight, 2)[0, 0]  # unit 0's 8 k-tiles x 256 slots of tile 0
    for j in range(8):
        for lane in range(32):
            row, k0 = lane % 16, 8 * (lane // 16)
            for e in range(8):
                k = k0 + e
                t, qh, h = (k % 8) // 2, k // 8, k % 2
                assert slots[j, 8 * lane + e] == weight[row, t * 32 + 4 * j + 2 * qh + h]


def _kernel_reads(view, tile: int, unit: int) -> torch.Tensor:
    """float32 [16, 128]: the weights of one row tile and unit as the kernel hands them to the tensor core, replayed
    lane by lane (lane_chunks' bounds from the descriptor's bytes, write_chunk's stores into the k-tiles at
    KTILE_BYTES apart, ldmatrix_x4's rows at 16 bytes a lane) and placed by the A fragment's rows and the B
    fragment's columns (mma k = 2 t + 8 qh + h is column t * 32 + 4 j + 2 qh + h)."""
    ktile = 528 // 2  # KTILE_BYTES in 16-bit slots
    first, count, low, high = (int(v) & 0xFFFFFFFF for v in view.meta[tile, unit])
    bounds = [(low >> (8 * k)) & 0xFF for k in range(4)] + [(high >> (8 * k)) & 0xFF for k in range(4)]
    smem = torch.zeros(8 * ktile, dtype=torch.int16)
    for lane in range(32):
        k = lane >> 2
        start, stop = first + bounds[k] + (lane & 3), first + (count if k == 7 else bounds[k + 1])
        for c in range(start, stop, 4):
            for i in range(8):
                smem[k * ktile + int(view.places[c, i])] = view.values[c, i]
    out = torch.zeros(16, 128)
    for j in range(8):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for m in range(4):  # A register m: matrix m of the x4 load, row g, elements 2t, 2t + 1
                row_address = j * ktile + (8 * m + g) * 8  # lane 8 m + g gave this row's address
                for h in range(2):
                    value = smem[row_address + 2 * t + h : row_address + 2 * t + h + 1].view(view.dtype).float()
                    row, qh = g + 8 * (m % 2), m // 2  # registers 0, 2: row g; 1, 3: g + 8; 2, 3: k + 8
                    out[row, t * 32 + 4 * j + 2 * qh + h] = value
    return out


def test_the_kernels_lane_arithmetic_gives_the_weight():
    packed = make_bitmap(40, 256, 0.7, seed=11)
    view = mma_scatter_layout.pack(packed, torch.bfloat16)
    weight = torch.zeros(view.tiles * 16, 256)
    weight[:40] = bitmap.unpack(packed).bfloat16().float()
    for tile in range(view.tiles):
        for unit in range(2):
            assert torch.equal(_kernel_reads(view, tile, unit), weight[tile * 16 : tile * 16 + 16, unit * 128 : unit * 128 + 128])


def test_refusals():
    with pytest.raises(ValueError, match="not a layout"):
        mma_scatter_layout.pack(make_bitmap(4, 200, 0.5), torch.bfloat16)
    with pytest.raises(ValueError, match="not a layout"):
        mma_scatter_layout.pack(make_bitmap(4, 256, 0.5), torch.float32)
    assert not cuda_mma_scatter.supported(torch.randn(1, 256, dtype=torch.bfloat16), make_bitmap(4, 256, 0.5))  # CPU input


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "sparsity"), [(37, 1024, 0.7), (300, 4096, 0.7), (70, 512, 0.0), (33, 640, 0.95), (8, 256, 1.0),
                                                        (129, 2048, 0.5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_equals_reference(rows, cols, sparsity, dtype):
    packed = on_device(make_bitmap(rows, cols, sparsity, seed=rows + cols), "cuda")
    weight = bitmap.unpack(packed).to(dtype).double()
    for batch in (1, 3, 8, 9, 16):
        x = torch.randn(batch, cols, device="cuda", dtype=dtype)
        assert cuda_mma_scatter.supported(x, packed)
        ref = x.double() @ weight.T
        for warps, rounds, ahead in ((None, None, 0), (1, 1, 0), (4, 2, 2), (8, 4, 3), (2, 3, 4)):
            got = cuda_mma_scatter.matmul(x, packed, warps, rounds, ahead).double()
            error = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item() if ref.norm() else got.abs().max().item()
            assert error < 4e-3, (batch, warps, rounds, ahead, error)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_large_batches_through_the_dispatcher(dtype, monkeypatch):
    # above 16 rows the activations are loaded a k-tile at a time, 64 rows a launch; with ALL_BATCHES the dispatcher
    # sends every batch here
    from compress.kernels import dispatch

    monkeypatch.setattr(cuda_mma_scatter, "ALL_BATCHES", True)

    packed = on_device(make_bitmap(70, 640, 0.7, seed=4), "cuda")
    weight = bitmap.unpack(packed).to(dtype).double()
    for batch in (17, 24, 33, 64, 65, 150):
        x = torch.randn(batch, 640, device="cuda", dtype=dtype)
        ref = x.double() @ weight.T
        for warps in (None, 1, 4):
            got = cuda_mma_scatter.matmul(x, packed, warps).double()
            assert ((got - ref).norm() / ref.norm()).item() < 4e-3, (batch, warps)
        assert torch.equal(dispatch.device_matmul(x, packed), cuda_mma_scatter.matmul(x, packed))
    with pytest.raises(ValueError, match="at most 4 above 16"):
        cuda_mma_scatter.matmul(torch.randn(20, 640, device="cuda", dtype=dtype), packed, 8)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_cuda_graph_capture():
    packed = on_device(make_bitmap(256, 4096, 0.7, seed=1), "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = cuda_mma_scatter.matmul(x, packed)
    assert torch.equal(graph_replay(lambda: cuda_mma_scatter.matmul(x, packed)), eager)
    x = torch.randn(100, 4096, device="cuda", dtype=torch.bfloat16)  # two launches, both captured
    eager = cuda_mma_scatter.matmul(x, packed)
    assert torch.equal(graph_replay(lambda: cuda_mma_scatter.matmul(x, packed)), eager)
