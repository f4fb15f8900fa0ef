"""The sparse tensor-core kernel for 2:4 int4 and 2:4 16-bit weights (compress.kernels.cuda_mma_sparse) and its
re-packed layouts (mma_sparse_layout): on CPU each layout, decoded with the kernel's index arithmetic and the assumed
metadata layout, equals the format's reference, and the layouts it refuses; on a GPU the kernel against the
reference."""

import pytest
import torch
from conftest import graph_replay, make_sparse_quant, on_device

from compress.formats import nm, sparse_quant
from compress.kernels import cuda_mma, cuda_mma_sparse, mma_sparse_layout

CUDA = torch.cuda.is_available() and cuda_mma.available()


@pytest.mark.parametrize(("rows", "cols", "group"), [(16, 128, 128), (37, 512, 128), (70, 1024, 256), (5, 256, 256)])
def test_layout_decodes_to_the_weight(rows, cols, group):
    packed = make_sparse_quant(rows, cols, 4, group, seed=rows)
    view = mma_sparse_layout.pack(packed)
    assert torch.equal(mma_sparse_layout.dense(view), sparse_quant.unpack(packed))


def make_2of4(rows: int, cols: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nm.NMWeight:
    """A 2:4 weight of the two largest of every four random values (some rows with a kept exact zero)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g).to(dtype).float()
    weight[::5, ::3] = 0.0
    keep = weight.abs().view(rows, -1, 4).argsort(dim=-1, descending=True, stable=True)[..., :2]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(rows, cols)
    return nm.pack(weight * mask, mask, 2, 4, dtype)


@pytest.mark.parametrize(("rows", "cols"), [(16, 128), (37, 512), (5, 256), (70, 1024)])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float16])
def test_values_layout_decodes_to_the_weight(rows, cols, stored, activations):
    packed = make_2of4(rows, cols, stored, seed=rows)
    view = mma_sparse_layout.pack_values(packed, activations)
    assert view.values.shape == (mma_sparse_layout.padded_tiles(rows), cols // 128, 4, 32, 4)
    assert torch.equal(mma_sparse_layout.dense_values(view), nm.unpack(packed).to(activations).float())


@pytest.mark.parametrize(("n", "m", "cols", "ok"), [(2, 4, 512, True), (1, 4, 512, False), (4, 8, 512, False), (2, 4, 260, False)])
def test_values_layouts_it_takes(n, m, cols, ok):
    weight = torch.zeros(4, cols)
    mask = torch.zeros(4, cols // m, m, dtype=torch.bool)
    mask[..., :n] = True
    packed = nm.pack(weight, mask.view(4, cols), n, m)
    assert mma_sparse_layout.values_shape_ok(packed) is ok
    assert not cuda_mma_sparse.supported(torch.randn(1, cols, dtype=torch.bfloat16), packed)  # CPU input
    with pytest.raises(ValueError, match="not a layout"):
        mma_sparse_layout.pack_values(packed, torch.float32 if ok else torch.bfloat16)


def test_every_instruction_chunk_is_one_group_and_positions_ascend():
    # each (instruction, chunk) of a unit is a distinct group of 4 columns, and a chunk's two positions ascend (the
    # ordered-metadata form of the instruction requires it)
    chunks = torch.arange(8).repeat(4)
    instructions = torch.arange(4).repeat_interleave(8)
    assert sorted(mma_sparse_layout._chunk_group(chunks, instructions).tolist()) == list(range(32))
    view = mma_sparse_layout.pack(make_sparse_quant(32, 256, 4, 128, seed=9))
    meta = view.positions.long() & 0xFFFFFFFF
    for row_half in range(2):
        for k in range(4):
            first = (meta >> mma_sparse_layout.meta_shift(row_half, k, 0)) & 3
            second = (meta >> mma_sparse_layout.meta_shift(row_half, k, 1)) & 3
            assert bool((first < second).all())


@pytest.mark.parametrize(("bits", "group", "zero_kind", "pattern", "ok"), [
    (4, 128, "integer", "2:4", True), (4, 256, "integer", "2:4", True),
    (3, 128, "integer", "2:4", False), (4, 64, "integer", "2:4", False), (4, 128, "float16", "2:4", False),
    (4, 128, "integer", "unstructured", False)])
def test_layouts_it_takes(bits, group, zero_kind, pattern, ok):
    packed = make_sparse_quant(4, 512, bits, group, zero_kind=zero_kind, pattern=pattern)
    assert mma_sparse_layout.shape_ok(packed) is ok
    assert not cuda_mma_sparse.supported(torch.randn(1, 512, dtype=torch.bfloat16), packed)  # CPU input
    if not ok:
        with pytest.raises(ValueError, match="not a layout"):
            mma_sparse_layout.pack(packed)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "group"), [(37, 1024, 128), (300, 4096, 128), (70, 512, 256), (1, 128, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_equals_reference(rows, cols, group, dtype):
    packed = on_device(make_sparse_quant(rows, cols, 4, group, seed=rows + cols), "cuda")
    for batch in (1, 3, 8, 9, 16):
        x = torch.randn(batch, cols, device="cuda", dtype=dtype)
        assert cuda_mma_sparse.supported(x, packed)
        ref = sparse_quant.reference_matmul(x.float(), packed).double()
        for row_tiles, warps, prefetch in ((1, 1, 0), (2, 4, 0), (2, 16, 0), (1, 8, 0), (2, 4, 3), (1, 8, 8)):
            got = cuda_mma_sparse.matmul(x, packed, row_tiles, warps, prefetch).double()
            assert ((got - ref).norm() / ref.norm()).item() < 4e-3, (batch, row_tiles, warps, prefetch)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_cuda_graph_capture_through_the_dispatcher():
    from compress.kernels import dispatch

    packed = on_device(make_sparse_quant(256, 4096, 4, 128, seed=1), "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = cuda_mma_sparse.matmul(x, packed)
    assert torch.equal(dispatch.device_matmul(x, packed), eager)  # the dispatcher sends 2:4 int4 weights here
    assert torch.equal(graph_replay(lambda: dispatch.device_matmul(x, packed)), eager)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols"), [(37, 1024), (300, 4096), (1, 128), (70, 640)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_values_equal_reference(rows, cols, dtype):
    packed = on_device(make_2of4(rows, cols, torch.bfloat16, seed=rows + cols), "cuda")
    for batch in (1, 3, 8, 9, 16):
        x = torch.randn(batch, cols, device="cuda", dtype=dtype)
        assert cuda_mma_sparse.supported(x, packed)
        ref = (x.double() @ nm.unpack(packed).to(dtype).double().T)
        for row_tiles, warps, prefetch in ((1, 1, 0), (2, 4, 0), (2, 16, 0), (1, 8, 0), (1, 8, 2), (2, 4, 5)):
            got = cuda_mma_sparse.matmul(x, packed, row_tiles, warps, prefetch).double()
            assert ((got - ref).norm() / ref.norm()).item() < 4e-3, (batch, row_tiles, warps, prefetch)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_cuda_values_graph_capture_through_the_dispatcher():
    from compress.kernels import dispatch

    packed = on_device(make_2of4(256, 4096, seed=2), "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = cuda_mma_sparse.matmul(x, packed)
    assert torch.equal(dispatch.device_matmul(x, packed), eager)  # the dispatcher sends 2:4 16-bit weights here
    assert torch.equal(graph_replay(lambda: dispatch.device_matmul(x, packed)), eager)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "bits", "group", "pattern", "grid_at"), [
    (129, 1024, 4, 128, "unstructured", (1, 9, 16, 40)), (70, 640, 3, 64, "unstructured", (1, 9, 16, 40)), (33, 512, 4, 128, "4:8", (1, 9, 16)),
    (40, 256, 2, 32, "2:4", ())])
def test_cuda_sparse_weights_on_their_grid_through_the_dispatcher(rows, cols, bits, group, pattern, grid_at):
    # the weights the sparse kernels read slower than the grid: on the group-quant kernels through the grid view, only
    # where they compute scale x (code - zero) exactly (a pruned weight exactly zero: never the scaled form)
    from compress.kernels import dispatch

    packed = on_device(make_sparse_quant(rows, cols, bits, group, pattern=pattern, seed=rows), "cuda")
    w = sparse_quant.unpack(packed).double()
    for batch in (1, 9, 16, 40):
        x = torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16)
        grid = dispatch._sparse_on_grid(x, packed)
        assert (grid is not None) is (batch in grid_at)
        ref = x.double() @ w.T
        got = dispatch.device_matmul(x, packed).double()
        assert ((got - ref).norm() / ref.norm()).item() < 4e-3, batch
    x = torch.randn(1, cols, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(graph_replay(lambda: dispatch.device_matmul(x, packed)), dispatch.device_matmul(x, packed))


def test_prefetching_kernels_are_named_and_instantiated():
    name = cuda_mma_sparse.kernel_name(torch.bfloat16, 1, 2, 4, values=True, prefetch=3)
    assert name == "nmmmasp_bf16_n1_r2_w4_f3" and "nm_mma_sp<true, 1, 2, 4, 3>(" in cuda_mma_sparse.entry_source(name)
    plain = cuda_mma_sparse.kernel_name(torch.float16, 2, 1, 8)
    assert plain == "gqmmasp_f16_n2_r1_w8" and "gq_mma_sp<false, 2, 1, 8>(" in cuda_mma_sparse.entry_source(plain)


def test_activation_exchange_gives_each_lane_its_b_fragment():
    # The kernel's activation loads and pair exchange (load_unit_sp, unit_dot_sp), replayed per lane, must put in B
    # register i of lane (g, t) the activations of mma k = 2t + 8i, +1 (the instruction's B layout), and those k must
    # be the columns the layout gave instruction j's chunks (chunk k // 4 -> the unit's group, position k % 4).
    x = torch.arange(128)  # column numbers of one unit stand in for the activations
    for j in range(4):
        loaded = {}
        for t in range(4):  # lane (g, t): pair P = t >> 1 reads columns P * 64 + j * 16 + (t & 1) * 8 .. + 7 as 4 words
            base = (t >> 1) * 64 + j * 16 + (t & 1) * 8
            loaded[t] = [(int(x[base + 2 * w]), int(x[base + 2 * w + 1])) for w in range(4)]
        sent = {t: (loaded[t][0], loaded[t][2]) if t & 1 else (loaded[t][1], loaded[t][3]) for t in range(4)}  # (odd ? x : y), (odd ? z : w)
        for t in range(4):
            mine, (v1, v2) = loaded[t], sent[t ^ 1]  # the partner's words arrive by the xor-1 shuffle
            b = [v1, v2, mine[1], mine[3]] if t & 1 else [mine[0], mine[2], v1, v2]
            for i in range(4):
                k = 2 * t + 8 * i
                chunk, position = k // 4, k % 4
                group = int(mma_sparse_layout._chunk_group(torch.tensor(chunk), torch.tensor(j)))
                assert b[i] == (4 * group + position, 4 * group + position + 1), (j, t, i)
