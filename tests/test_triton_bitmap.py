"""The bitmap (unstructured sparse) GPU kernel (compress/kernels/triton_bitmap.py), for bitmap values and unstructured
sparse_quant codes, against the formats' references:
under Triton's interpreter on CPU tensors without a GPU (odd shapes, partial words and blocks, empty rows, every
sparsity from none kept to all kept, batches 1-5 and the dense prefill path), and on CUDA where it exists (the
dispatcher's choice, a CUDA-graph capture)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import graph_replay, make_sparse_quant, on_device

from compress.formats import bitmap, sparse_quant

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the GPU kernels cannot be tested", allow_module_level=True)

from compress.kernels import triton_bitmap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: conftest chose Triton's interpreter


def make_bitmap(rows: int, cols: int, keep: float, dtype=torch.bfloat16, seed: int = 0) -> bitmap.BitmapWeight:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < keep
    if rows > 2:
        mask[2] = False  # a row with no kept weight
    weight = torch.randn(rows, cols, generator=g).to(dtype).float() * mask
    packed = bitmap.pack(weight, mask, dtype)
    return on_device(packed, DEVICE)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("rows", "cols", "keep"), [(37, 1000, 0.3), (5, 256, 0.05), (16, 600, 1.0), (9, 64, 0.5), (3, 2080, 0.7)])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_equals_reference(rows, cols, keep, batch):
    packed = make_bitmap(rows, cols, keep, seed=rows + batch)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):  # bf16: one output rounding, sums in another order
        x = torch.randn(batch, cols, device=DEVICE).to(dtype)
        got = triton_bitmap.matmul(x, packed)
        assert got.dtype == dtype and got.shape == (batch, rows)
        assert relative_error(got, bitmap.reference_matmul(x, packed)) < bound, (dtype, keep)


@pytest.mark.parametrize(("rows", "cols", "bits", "group", "zero_kind", "batch"), [
    (37, 1000, 4, 128, "integer", 1), (9, 600, 3, 64, "float16", 3), (5, 256, 2, 32, "integer", 5), (6, 300, 8, 100, "integer", 2)])
def test_sparse_quant_codes_equal_reference(rows, cols, bits, group, zero_kind, batch):
    # 3 of every 4 columns kept at random, stored unstructured: a row's codes start at a word boundary
    packed = make_sparse_quant(rows, cols, bits, group, n=3, m=4, zero_kind=zero_kind, pattern="unstructured", seed=rows)
    packed = on_device(packed, DEVICE)
    x = torch.randn(batch, cols, device=DEVICE)
    assert relative_error(triton_bitmap.matmul(x, packed), sparse_quant.reference_matmul(x, packed)) < 1e-5
    assert triton_bitmap.supports(packed) and not triton_bitmap.supports(make_sparse_quant(4, 64, 4, 32))  # N:M: triton_kernels.py


def test_nothing_kept_and_prefill():
    empty = make_bitmap(8, 300, 0.0)
    assert empty.values.numel() == 0
    assert torch.equal(triton_bitmap.matmul(torch.randn(2, 300, device=DEVICE), empty), torch.zeros(2, 8, device=DEVICE))
    packed = make_bitmap(12, 320, 0.3, torch.float16, seed=3)
    x = torch.randn(2, 10, 320, device=DEVICE, dtype=torch.float16)  # 20 rows: past MAX_BATCH, the decoded weight
    got = triton_bitmap.matmul(x, packed)
    assert got.shape == (2, 10, 12) and relative_error(got, bitmap.reference_matmul(x, packed)) < 1e-2


def test_view_block_starts():
    packed = make_bitmap(6, 700, 0.4, seed=5)
    view = triton_bitmap.build_view(packed)
    mask = bitmap.read_bitmask(packed.bitmask, 700)
    before = torch.cumsum(mask.reshape(-1).long(), 0).view(6, 700) - mask.long()  # kept values before each column, row-major
    span = 32 * triton_bitmap.WORD_BLOCK
    assert torch.equal(view.block_start.long(), before[:, ::span])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_and_graph_capture():
    from compress.kernels import dispatch

    packed = make_bitmap(512, 4096, 0.3, seed=7)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert dispatch.kernel_for(x, packed) == "triton"
    eager = dispatch.device_matmul(x, packed)
    assert relative_error(eager, bitmap.reference_matmul(x, packed)) < 1e-2
    assert torch.equal(graph_replay(lambda: dispatch.device_matmul(x, packed)), eager)
