"""The Triton kernels (compress/kernels/triton_kernels.py) against each format's plain-torch reference.

On a machine without a GPU every kernel runs under TRITON_INTERPRET=1 on CPU tensors, on small odd shapes
(partial last groups and tiles, several split-K programs, batch 1 / 3 / 16); the real-CUDA tests run only
where CUDA exists. Everything here is skipped, with the reason, where Triton is not installed."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import make_group_quant, make_sparse_quant

from compress.formats import group_quant, nm, sparse_quant

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install triton): the GPU kernels cannot be tested", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # the interpreter is chosen when a kernel is defined, so before the kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

from compress.kernels import dispatch  # noqa: E402
from compress.kernels import triton_config as tc  # noqa: E402
from compress.kernels import triton_kernels as tk  # noqa: E402


def nm_mask(rows, cols, n, m, g):
    order = torch.rand(rows, cols // m, m, generator=g).argsort(-1)
    return (order < n).reshape(rows, cols)


def make_nm(rows, cols, n, m, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = nm_mask(rows, cols, n, m, g)
    weight = (torch.randn(rows, cols, generator=g).to(dtype).float()) * mask
    return nm.pack(weight, mask, n, m, dtype)


REFERENCE = {group_quant.GroupQuantWeight: group_quant.reference_matmul, nm.NMWeight: nm.reference_matmul,
             sparse_quant.SparseQuantWeight: sparse_quant.reference_matmul}


def check(packed, batch, dtype, device="cpu", config=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, packed.shape[1], generator=g).to(dtype)
    ref = REFERENCE[type(packed)](x.float(), packed).double()  # fp32 activations: the exact product in fp32
    if device != "cpu":
        packed = type(packed)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(packed).items()})
    out = tk.packed_matmul(x.to(device), packed, config)
    assert out.dtype == dtype and out.shape == (batch, packed.shape[0])
    out = out.double().cpu()
    assert torch.isfinite(out).all()
    error = ((out - ref).norm() / ref.norm()).item()
    # fp32 in: summation order only; bf16/fp16: the output rounding, and on the dot path the weights too
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    assert error < limit, f"batch {batch} {dtype} {config}: relative error {error:.2e} >= {limit:.0e}"


# small tiles so a small shape still has several programs along N, M and K (split-K, atomics); batch 1 takes the
# FMA kernel (kernel="auto"), batch 3 and 16 the dot kernel
SMALL = {1: tk.Config(1, 16, 64, split_k=3), 3: tk.Config(4, 16, 32, split_k=2), 16: tk.Config(16, 16, 32, split_k=2)}
interpret = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on CPU-only machines (the CUDA tests cover the kernels)")


def plan(packed, batch, config):
    return tc.launch_plan(tc.format_args(packed, packed.shape[1]), config, batch, *packed.shape, 4)


@interpret
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero_kind", ["integer", "float16"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_group_quant_interpreted(bits, zero_kind, batch):
    # 33 x 160 with groups of 48: a partial last group, groups straddling tiles; 7 x 64 with g32: one group a tile
    check(make_group_quant(33, 160, bits, 48, zero_kind), batch, torch.float32, config=SMALL[batch])
    check(make_group_quant(7, 64, bits, 32, zero_kind, seed=2), batch, torch.bfloat16, config=SMALL[batch])


@interpret
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (3, 5)])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_nm_interpreted(pattern, batch):
    n, m = pattern
    cols = 160 if 160 % m == 0 else 165
    check(make_nm(33, cols, n, m), batch, torch.float32, config=SMALL[batch])
    check(make_nm(7, 64 if 64 % m == 0 else 70, n, m, torch.float16, seed=3), batch, torch.float16, config=SMALL[batch])


@interpret
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("zero_kind", ["integer", "float16"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_sparse_quant_interpreted(bits, zero_kind, batch):
    check(make_sparse_quant(33, 160, bits, 48, zero_kind=zero_kind), batch, torch.float32, config=SMALL[batch])
    check(make_sparse_quant(7, 128, bits, 32, zero_kind=zero_kind, seed=4), batch, torch.bfloat16, config=SMALL[batch])
    # groups of 64: on the FMA path each step's 32 kept values span 64 columns, one group (one scale a row)
    check(make_sparse_quant(9, 256, bits, 64, zero_kind=zero_kind, seed=5), batch, torch.float32, config=SMALL[batch])


FMA = [tk.Config(4, 8, 128, 1, 1, 2, "fma"), tk.Config(2, 4, 128, 2, 1, 2, "fma")]  # 4 / 2 batch rows a program, split 1 / 2


@interpret
@pytest.mark.parametrize("config", FMA, ids=["bm4-split1", "bm2-split2"])
def test_fma_kernel_interpreted(config):
    # group_quant: whole steps and a masked tail (100 columns), int3 chunks straddling groups (STATS 1), groups
    # smaller than a chunk (STATS 2: g16); N:M 2:4, 1:4, 1:2 and 2:4 + int2/int4/int8 codes; batch 3 and 1
    cases = [make_group_quant(9, 100, 4, 32), make_group_quant(5, 200, 3, 64, "float16"), make_group_quant(6, 96, 4, 16),
             make_group_quant(4, 256, 2, 128), make_group_quant(5, 64, 8, 32, "float16"), make_nm(9, 256, 2, 4), make_nm(5, 192, 1, 4),
             make_nm(4, 128, 1, 2, torch.float16), make_sparse_quant(9, 256, 4, 64), make_sparse_quant(5, 128, 8, 32, zero_kind="float16"),
             make_sparse_quant(4, 256, 2, 128)]
    stats = set()
    for i, packed in enumerate(cases):
        p = plan(packed, 3, config)
        assert p["kernel"] == "fma"
        stats.add(p.get("stats"))
        check(packed, 3 if i % 2 else 1, torch.bfloat16 if i % 3 == 0 else torch.float32, config=config)
    assert stats == {0, 1, 2, None}


DOT = [tk.Config(16, 16, 64, 1, 4, 2, "dot"), tk.Config(1, 8, 128, 2, 4, 2, "dot")]  # batch padded to 16 / one row a program


@interpret
@pytest.mark.parametrize("config", DOT, ids=["bm16-split1", "bm1-split2"])
def test_dot_kernel_interpreted(config):
    # the fast tiles (one group a sub-step: int2/4/8, N:M 2:4 and 1:4, 2:4 + int4/int8), int3 (sub-steps over two
    # groups), the generic ones (4:8, 2:4 + int3, a group without a power-of-two divisor >= 16: g24); batch 1 and 5
    cases = {1: [make_group_quant(9, 256, 4, 128), make_group_quant(5, 192, 2, 64, "float16"), make_group_quant(6, 160, 8, 32),
                 make_nm(9, 256, 2, 4), make_nm(5, 192, 1, 4, torch.float16), make_sparse_quant(9, 256, 4, 64),
                 make_sparse_quant(5, 256, 8, 128, zero_kind="float16")],
             2: [make_group_quant(9, 130, 3, 64), make_group_quant(5, 300, 3, 128, "float16")],
             0: [make_group_quant(5, 96, 4, 24), make_nm(5, 64, 4, 8), make_sparse_quant(6, 128, 3, 64)]}
    for i, (fast, packed) in enumerate((fast, packed) for fast, weights in cases.items() for packed in weights):
        assert plan(packed, 5, config)["fast"] == fast
        check(packed, 5 if i % 2 else 1, torch.bfloat16 if i % 3 == 0 else torch.float32, config=config)


@interpret
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_default_config_interpreted(batch):
    # the tiles the GPU would pick (no explicit config), a 2-D activation batch
    for packed in (make_group_quant(9, 256, 4, 128), make_nm(9, 256, 2, 4), make_sparse_quant(9, 256, 4, 128)):
        x = torch.randn(batch, 2, 256).to(torch.bfloat16)
        out = tk.packed_matmul(x, packed)
        ref = REFERENCE[type(packed)](x.float(), packed)
        assert out.shape == (batch, 2, 9) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    # batch 1: int2/4/8 take the split-K GEMV, int3 the FMA GEMV (4 rows); batch 4: the dot kernel
    assert tc.default_config(1, make_group_quant(9, 256, 4, 128), torch.device("cpu")).kernel == "splitk"
    assert tc.default_config(4, make_group_quant(9, 256, 4, 128), torch.device("cpu")).kernel == "dot"
    assert tc.default_config(16, make_group_quant(9, 256, 4, 128), torch.device("cpu")).kernel == "dot"
    tall = make_group_quant(300, 256, 4, 128)
    assert tc.default_config(1, tall, torch.device("cpu")) == tk.Config(1, 4, 2048, 1, 2, 1, "splitk")
    assert tc.default_config(1, make_group_quant(300, 256, 3, 128), torch.device("cpu")).block_n == 4
    if batch == 1:
        check(tall, 1, torch.bfloat16)


SPLITK = [tk.Config(4, 4, 0, 1, 1, 1, "splitk"), tk.Config(2, 8, 0, 3, 1, 2, "splitk")]  # 4 / 2 batch rows a program, split 1 / 3


@interpret
@pytest.mark.parametrize("config", SPLITK, ids=["bm4-split1", "bm2-split3"])
def test_splitk_kernel_interpreted(config):
    # int2/4/8, integer and fp16 zero points, a partial last group (1100 = 8 x 128 + 76), rows not a multiple of the
    # tile, groups of 2 words (int4 g16: 2 words a lane), batch 1-4 and 16 (4 programs along the batch)
    cases = [make_group_quant(13, 1100, 4, 128), make_group_quant(7, 520, 2, 64, "float16"), make_group_quant(9, 300, 8, 32),
             make_group_quant(5, 96, 4, 16, "float16"), make_group_quant(6, 256, 4, 32)]
    for i, packed in enumerate(cases):
        assert plan(packed, 1, config)["kernel"] == "splitk"
        for batch in ((1, 4) if i % 2 else (2, 3)) + ((16,) if i == 0 else ()):
            check(packed, batch, torch.bfloat16 if (i + batch) % 2 else torch.float32, config=config)
    assert plan(make_group_quant(5, 100, 3, 128), 1, config)["kernel"] == "fma"  # int3: no split-K GEMV
    # 2:4 with bf16 and fp16 values, 2:4 + int4 (integer and fp16 zero points, groups of 32 to 128 columns): a partial
    # last index word (1000 columns: 500 kept values, 31.25 words), K splits
    for packed in (make_nm(13, 1000, 2, 4), make_nm(6, 256, 2, 4, torch.float16), make_nm(9, 4096, 2, 4), make_sparse_quant(13, 1000, 4, 128),
                   make_sparse_quant(7, 384, 4, 96, zero_kind="float16"), make_sparse_quant(5, 256, 4, 32)):
        assert plan(packed, 1, config)["kernel"] == "splitk"
        for batch in (1, 3):
            check(packed, batch, torch.float32 if batch == 1 else torch.bfloat16, config=config)
        default = tc.default_config(1, packed, torch.device("cpu")).kernel
        assert default == ("fma" if isinstance(packed, sparse_quant.SparseQuantWeight) else "splitk")  # 2:4 + int4: not timed yet
    assert plan(make_nm(5, 64, 4, 8), 1, config)["kernel"] == "dot"  # 4:8: no split-K GEMV (nor an FMA one)


def test_out_of_shared_memory_retries_with_fewer_stages(monkeypatch):
    # a tile past the device's shared memory (OutOfResources before the kernel runs) is retried with one stage
    # fewer and the stages that fit are remembered; generic tiles take 128-column steps at most
    from triton.runtime.errors import OutOfResources

    launch, stages = tk._launch, []

    def small_device(x2, out, args, plan, cfg):
        stages.append(cfg.num_stages)
        if cfg.num_stages > 2:
            raise OutOfResources(300000, 232448, "shared memory")
        launch(x2, out, args, plan, cfg)

    monkeypatch.setattr(tk, "_launch", small_device)
    config = tk.Config(4, 16, 32, 1, 1, 4, "dot")
    for _ in range(2):
        check(make_group_quant(7, 64, 4, 32), 3, torch.bfloat16, device="cuda" if HAS_CUDA else "cpu", config=config)
    assert stages == [4, 3, 2, 2]
    assert plan(make_nm(5, 64, 4, 8), 1, tk.Config(2, 16, 2048, 1, 2, 3, "fma"))["block_k"] == 128


def test_dispatch_choices(monkeypatch):
    packed = make_group_quant(4, 32, 4, 32)
    x = torch.randn(2, 32)
    assert dispatch.kernel_for(x, packed) == "cpu"  # CPU tensors never take Triton
    unstructured = sparse_quant.pack(torch.rand(4, 32) < 0.5, torch.randint(0, 16, (4, 32)), torch.ones(4, 1), torch.zeros(4, 1), 4, 32)
    assert not tk.supports(unstructured) and tk.supports(packed)
    if HAS_CUDA:
        assert dispatch.kernel_for(x.cuda(), packed) == "triton"
        monkeypatch.setenv("COMPRESS_GPU_KERNEL", "torch")
        assert dispatch.kernel_for(x.cuda(), packed) == "torch"


cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


# every format of the CUDA tests, by name (a failure names its format)
CUDA_FORMATS = {"int4_1000": lambda: make_group_quant(257, 1000, 4, 128), "int3_700": lambda: make_group_quant(130, 700, 3, 128),
                "int2_g64": lambda: make_group_quant(64, 512, 2, 64), "int8_g32_f16zero": lambda: make_group_quant(96, 320, 8, 32, "float16"),
                "nm_2:4": lambda: make_nm(257, 1024, 2, 4), "nm_4:8": lambda: make_nm(65, 640, 4, 8),
                "sq_2:4_int4": lambda: make_sparse_quant(129, 1024, 4, 128),
                "sq_2:4_int4_g96_f16zero": lambda: make_sparse_quant(33, 384, 4, 96, zero_kind="float16")}


@cuda
@pytest.mark.parametrize("fmt", list(CUDA_FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_all_formats(fmt, dtype):
    packed = CUDA_FORMATS[fmt]()
    for batch in (1, 3, 16, 70):  # the default tiles of every batch class (FMA / narrow dot, padded dot, wide dot)
        check(packed, batch, dtype, device="cuda")


@cuda
@pytest.mark.parametrize("config", FMA + DOT + [tk.Config(1, 8, 1024, 1, 1, 4, "fma"), tk.Config(2, 16, 2048, 1, 2, 3, "fma"),
                                                tk.Config(16, 64, 128, 1, 4, 4, "dot"), tk.Config(32, 32, 256, 3, 4, 3, "dot"),
                                                tk.Config(1, 16, 512, 1, 1, 3, "dot"), tk.Config(4, 16, 512, 1, 1, 3, "dot"), *SPLITK,
                                                tk.Config(1, 4, 2048, 1, 2, 1, "splitk")])
def test_cuda_kernels_configs(config):
    # every kernel and a few sweep-like tiles (the benchmark's --sweep runs more) on every format, compiled
    for packed in (make_group_quant(300, 1024, 4, 128), make_group_quant(70, 640, 3, 128), make_group_quant(64, 512, 2, 64),
                   make_group_quant(96, 512, 8, 128, "float16"), make_nm(257, 1024, 2, 4), make_nm(65, 512, 1, 4),
                   make_sparse_quant(129, 1024, 4, 128), make_sparse_quant(40, 512, 8, 128, zero_kind="float16")):
        for batch in (1, 3, 16):
            check(packed, batch, torch.bfloat16, device="cuda", config=config)
