"""The CUDA group-quant GEMV (compress.kernels.cuda_gemv, measured against the Triton GEMV, not dispatched): which
layouts it takes (CPU), and on a GPU its results against the format's plain-torch reference on odd shapes, partial
words and groups, both zero-point kinds, every rows-a-warp and team size."""

import pytest
import torch
from conftest import graph_replay, make_group_quant, on_device

from compress.formats import group_quant
from compress.kernels import cuda_gemv

CUDA = torch.cuda.is_available() and cuda_gemv.available()


def random_weight(rows: int, cols: int, bits: int, group: int, zero_kind: str = "integer", seed: int = 0, device: str = "cpu"):
    packed = make_group_quant(rows, cols, bits, group, zero_kind, seed)
    return on_device(packed, device)


@pytest.mark.parametrize(("cols", "bits", "group", "ok"), [
    (4096, 4, 128, True), (1020, 4, 128, True),   # 1020: a partial last word and group, 128 words a row
    (1000, 4, 128, False),                          # 125 words a row: not whole 16-byte chunks
    (4096, 4, 96, False), (4096, 4, 16, False),     # a group that is not a power of two / smaller than a chunk
    (4096, 2, 64, True), (4096, 8, 16, True), (4096, 3, 128, False)])
def test_layouts_it_takes(cols, bits, group, ok):
    assert cuda_gemv.shape_ok(random_weight(3, cols, bits, group)) is ok


def test_cpu_inputs_are_refused():
    packed = random_weight(3, 256, 4, 32)
    assert not cuda_gemv.supported(torch.randn(1, 256, dtype=torch.bfloat16), packed)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "bits", "group", "zero_kind"), [
    (37, 1020, 4, 128, "integer"), (5, 4096, 2, 64, "integer"), (130, 2032, 8, 16, "integer"),
    (7, 256, 4, 32, "float16"), (300, 14336, 4, 128, "integer"), (64, 512, 2, 128, "float16"), (1, 128, 4, 32, "integer")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_equals_reference(rows, cols, bits, group, zero_kind, dtype):
    packed = random_weight(rows, cols, bits, group, zero_kind, seed=rows + cols, device="cuda")
    assert cuda_gemv.shape_ok(packed)
    x = torch.randn(1, cols, device="cuda", dtype=dtype)
    assert cuda_gemv.supported(x, packed) and not cuda_gemv.supported(torch.cat([x, x]), packed)  # batch 1 only
    ref = group_quant.reference_matmul(x.float(), packed).double()
    for rows_together in cuda_gemv.ROWS:  # every kernel shape plan can pick, whatever it picks here
        for team in cuda_gemv.TEAMS:
            got = cuda_gemv.group_quant_matmul(x, packed, rows_together, team).double()
            # fp32 sums in another order, one rounding to the activations' dtype
            assert ((got - ref).norm() / ref.norm()).item() < 4e-3, (rows_together, team)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and NVRTC")
def test_cuda_graph_capture():
    packed = random_weight(256, 4096, 4, 128, device="cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = cuda_gemv.group_quant_matmul(x, packed)
    assert torch.equal(graph_replay(lambda: cuda_gemv.group_quant_matmul(x, packed)), eager)
