"""A bitmap weight as a 2:4 part plus overflow outliers (compress.kernels.nm_split): on CPU the split is the weight
exactly, its outliers are what groups keep past two, and it multiplies as the bitmap reference; on a GPU the sparse
tensor-core part with the correction kernel against the reference, in and out of a CUDA graph and through the
dispatcher once it takes the split."""

import pytest
import torch
from conftest import graph_replay, on_device
from test_cuda_mma_bitmap import make_bitmap

from compress.formats import bitmap, nm
from compress.kernels import cuda_mma, extras_view, nm_split

CUDA = torch.cuda.is_available() and cuda_mma.available()


@pytest.mark.parametrize(("rows", "cols", "sparsity"), [(37, 256, 0.7), (16, 128, 0.0), (5, 384, 1.0), (64, 512, 0.5), (33, 132, 0.9)])
def test_split_is_the_weight(rows, cols, sparsity):
    packed = make_bitmap(rows, cols, sparsity, seed=rows)
    view = nm_split.split(packed)
    assert (view.dense.n, view.dense.m) == (2, 4) and view.dense.values.dtype == packed.values.dtype
    weight = nm.unpack(view.dense)
    assert bool((weight[view.rows, view.cols.long()] == 0).all())  # the 2:4 part is zero where an outlier is
    weight.index_put_((view.rows, view.cols.long()), view.delta, accumulate=True)
    assert torch.equal(weight, bitmap.unpack(packed))
    kept = bitmap.read_bitmask(packed.bitmask, cols).view(rows, -1, 4).sum(-1)
    assert view.delta.numel() == int((kept - 2).clamp_min(0).sum())
    assert nm_split.overflow_share(packed) == pytest.approx(view.delta.numel() / (rows * cols))
    assert view.row_ptr[-1] == view.delta.numel() and bool((view.row_ptr[1:] >= view.row_ptr[:-1]).all())


def test_the_largest_two_stay_in_the_part():
    weight = torch.tensor([[0.5, -3.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0]])
    keep = weight != 0
    view = nm_split.split(bitmap.pack(weight, keep, torch.bfloat16))
    assert nm.unpack(view.dense).tolist() == [[0.0, -3.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0]]
    assert view.cols.tolist() == [0] and view.delta.tolist() == [0.5]


def test_multiplies_as_the_reference_and_refusals():
    packed = make_bitmap(40, 256, 0.7, seed=5)
    x = torch.randn(3, 256)
    got = extras_view.matmul(x, nm_split.split(packed), nm.reference_matmul)
    assert torch.allclose(got, bitmap.reference_matmul(x, packed), atol=1e-4)
    with pytest.raises(ValueError, match="groups of 4"):
        nm_split.split(make_bitmap(4, 6, 0.5))


def test_preferred_only_below_the_threshold(monkeypatch):
    sparse, dense = make_bitmap(32, 256, 0.8, seed=1), make_bitmap(32, 256, 0.4, seed=2)
    assert not nm_split.preferred(sparse)  # off until measured
    monkeypatch.setattr(nm_split, "SPLIT_MAX_OVERFLOW", 0.05)
    assert nm_split.preferred(sparse) and not nm_split.preferred(dense)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_equals_reference_and_dispatch(dtype, monkeypatch):
    from compress.kernels import dispatch

    packed = on_device(make_bitmap(300, 1024, 0.7, seed=7), "cuda")
    weight = bitmap.unpack(packed).to(dtype).double()
    for batch in (1, 9, 16, 40):
        x = torch.randn(batch, 1024, device="cuda", dtype=dtype)
        ref = x.double() @ weight.T
        got = nm_split.matmul(x, packed).double()
        assert ((got - ref).norm() / ref.norm()).item() < 4e-3, batch
    monkeypatch.setattr(nm_split, "SPLIT_MAX_OVERFLOW", 0.05)
    x = torch.randn(1, 1024, device="cuda", dtype=dtype)
    eager = nm_split.matmul(x, packed)
    assert torch.equal(dispatch.device_matmul(x, packed), eager)
    assert torch.equal(graph_replay(lambda: dispatch.device_matmul(x, packed)), eager)
