"""GPU kernels (compress/kernels/triton_*.py) vs dense bf16 F.linear and the peers: those torch ships,
`torch._weight_int4pack_mm` (tinygemm, int4 g128) and cuSPARSELt 2:4 (`torch._cslt_sparse_mm` after its
algorithm search), and where installed humming-kernels (int4/3/2/8 g128) and bitsandbytes NF4
(benchmarks/gpu_peers.py; not in a --sweep, or with --no-extra-peers); a peer that fails is skipped with the
reason printed.

    python benchmarks/gpu_kernels.py [--shapes 4096x4096,...] [--batches 1,4,16,64] [--formats ...] [--json out.jsonl]
    python benchmarks/gpu_kernels.py --sweep [--shapes ...] [--formats ...] [--sweep-batches 1,16] [--json sweep.jsonl]

Shapes: out x in (y = x @ W.T), activations bf16. A timing is one call: a CUDA graph calling the op on each of
R weight copies (> 3x the L2: weights come from HBM), replayed; the median replay / R. GB/s counts packed weight,
x and y. The default run checks each format against its dequantized weight, then records per (format, shape,
batch): us, gbps, ratio_vs_dense, ratio_vs_best_peer (fastest of dense and the peers), ratio_vs_same_bits_peer
(fastest peer storing the same weight bits, named in same_bits_peer), config. `--sweep` (default
shapes SWEEP_SHAPES) times a grid of candidates (kernel, tiles, warps, stages, split-K) per format, shape and sweep
batch, compiled up front in parallel; it records the best beside the default (best_us, best_config, default_us,
all: every candidate's time) and tabulates the winners by (format, batch) to set triton_config.py's defaults from."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_decode
import gpu_peers

from compress.formats import bitmap, group_quant, lut, nm, sparse_quant, spqr
from compress.formats.quantized import Outliers, QuantizedWeight
from compress.formats.words import tensor_bytes
from compress.kernels import (
    cuda_mma,
    cuda_mma_extras,
    cuda_mma_scatter,
    cuda_mma_sparse,
    dispatch,
    extras_view,
    mma_extras_layout,
    mma_lut_layout,
    nm_split,
    triton_bitmap,
    triton_outliers,
    views,
)
from compress.kernels import triton_config as tc
from compress.kernels import triton_gemv as tg
from compress.kernels import triton_kernels as tk

FORMATS = ("int4_g128", "int3_g128", "int3_g128@widened", "int2_g128", "int8_g128", "nm_2:4_bf16", "2:4+int4_g128", "2:4+int4_g128@splitk",
           "spqr3_g16", "lut3", "bitmap70_bf16", "sparse50+int4_g128")
VIEW_FORMATS = ("spqr3_g16", "lut3", "lut4")  # through their kernel views (extras_view.py), timed as a module calls them: dispatch.device_matmul
FORCED_KERNELS = {"mma": "cuda_mma scaled", "scatter": "cuda_mma_scatter", "split": "cuda_mma_sparse + outliers",
                  "fused": "cuda_mma + permutation and outliers"}
FORCED = {"splitk": tc.Config(1, 4, 2048, 1, 2, 1, "splitk")}  # FORMAT@KERNEL: that kernel at batch 1 (not yet the default)
# FORMAT@mma: the tensor-core kernel's scaled form at batch 1-16 (groups of 16-64, float zero points; SpQR's grid through
# its view) or its table form (LUT) forced, e.g. int4_g32@mma, int4_g16f@mma, spqr3_g16@mma, lut3@mma (the dispatcher's
# choice there too now; FORMAT@triton times the Triton path beside it)
# FORMAT@scatter: a bitmap weight on the shared-memory scatter kernel (cuda_mma_scatter.py) at every batch
# FORMAT@split: a bitmap weight as a 2:4 part on the sparse tensor cores plus outliers (nm_split.py) at batch 1-16
# FORMAT@fused: a SpQR / LUT weight in one launch, its permutation and outliers read by the tensor-core kernel
# (cuda_mma_extras.py) at batch 1-16, against FORMAT@mma's three launches; SpQR on its compact form (mma_spqr_layout.py),
# spqr3_g16@fused@scaled on the scaled form of its view's grid
# FORMAT@widened: the 3-bit codes read as 4-bit words (views.widen, what dispatch gives a module); bytes: the widened form's
SWEEP_SHAPES = "4096x4096,14336x4096,4096x14336,8192x8192,11008x4096"


def make(fmt: str, rows: int, cols: int, device: str):
    """A random packed weight of the format (codes, statistics and masks uniform at random, groups of 128 unless the
    name says another, e.g. int4_g32; a trailing f: float zero points)."""
    g = torch.Generator(device="cpu").manual_seed(rows * 7 + cols)
    group = int(re.search(r"_g(\d+)", fmt).group(1)) if fmt.startswith("int") else 128
    bits, groups = (int(fmt[3]) if fmt.startswith("int") else 4), -(-cols // group)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
    scale = (torch.rand(rows, groups, generator=g) * 0.02 + 0.001).half().float()
    zero = torch.randint(0, 2**bits, (rows, groups), generator=g).float()
    mask = (torch.rand(rows, cols // 4, 4, generator=g).argsort(-1) < 2).reshape(rows, cols)
    if fmt == "spqr3_g16":  # 3-bit g16, 3-bit statistics, 1% outliers, a permutation (gpu_decode.spqr_target's grids)
        _, quantized, _ = gpu_decode.spqr_target(torch.randn(rows, cols, generator=g) * 0.02)
        packed = spqr.from_quantized(quantized)
    elif fmt in ("lut3", "lut4"):  # 3- or 4-bit codes into per-row tables, 1% outliers, a permutation
        lut_bits = int(fmt[3])
        quantized = QuantizedWeight((rows, cols), lut_bits, cols, torch.randint(0, 2**lut_bits, (rows, cols), generator=g), None, None,
                                    lut=(torch.randn(rows, 2**lut_bits, generator=g) * 0.02).half(),
                                    perm=torch.randperm(cols, generator=g))
        quantized.outliers = Outliers.from_mask(torch.randn(rows, cols, generator=g) * 0.1, torch.rand(rows, cols, generator=g) < 0.01)
        packed = lut.from_quantized(quantized)
    elif fmt.startswith("int"):
        float_zero = fmt.endswith("f")
        zero = (torch.rand(rows, groups, generator=g) * (2**bits - 1)).half().float() if float_zero else zero
        packed = group_quant.pack(codes, scale, zero, bits, group, "float16" if float_zero else "integer")
    elif fmt.startswith("bitmap"):  # bitmap{sparsity %}_bf16: that share of weights pruned at random
        keep = torch.rand(rows, cols, generator=g) >= int(fmt[len("bitmap"):].split("_")[0]) / 100
        packed = bitmap.pack(torch.randn(rows, cols, generator=g).bfloat16().float() * keep, keep, torch.bfloat16)
    elif fmt.startswith("sparse"):  # sparse{%}+int4_g128: that share pruned at random, the rest int4 g128
        keep = torch.rand(rows, cols, generator=g) >= int(fmt[len("sparse"):].split("+")[0]) / 100
        packed = sparse_quant.pack(keep, codes, scale, zero, 4, 128, "unstructured")
    elif fmt.startswith("nm"):
        packed = nm.pack(torch.randn(rows, cols, generator=g).bfloat16().float() * mask, mask, 2, 4, torch.bfloat16)
    else:
        packed = sparse_quant.pack(mask, codes, scale, zero, 4, 128, "2:4")
    return type(packed)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(packed).items()})


def unpack(packed) -> torch.Tensor:
    return {group_quant.GroupQuantWeight: group_quant.unpack, nm.NMWeight: nm.unpack, bitmap.BitmapWeight: bitmap.unpack,
            sparse_quant.SparseQuantWeight: sparse_quant.unpack, spqr.SpQRWeight: spqr.unpack, lut.LUTWeight: lut.unpack}[type(packed)](packed)


def op_for(packed):
    """What a module calls for this weight: the dispatcher's choice (the tensor-core kernels at batch 1-16 of 16-bit
    activations where one takes the weight, SpQR / LUT through their views, else the Triton kernels)."""
    return dispatch.device_matmul


def kernel_name(packed, batch: int) -> str:
    """The kernel the dispatcher runs for bf16 activations of this batch: "cuda_mma <its launch>" or "triton"."""
    x = torch.empty(batch, packed.shape[1], device="cuda", dtype=torch.bfloat16)
    if dispatch._choice() != "auto":
        return dispatch._choice()
    if isinstance(packed, group_quant.GroupQuantWeight) and cuda_mma.supported(x, packed):
        return f"cuda_mma {cuda_mma.plan(cuda_mma.view_of(packed), batch, x.device)}"
    if isinstance(packed, group_quant.GroupQuantWeight) and cuda_mma.form_supported(x, packed):
        return f"cuda_mma scaled {cuda_mma.plan(cuda_mma.view_of(packed, x.dtype), batch, x.device)}"
    if isinstance(packed, (sparse_quant.SparseQuantWeight, nm.NMWeight)) and cuda_mma_sparse.supported(x, packed):
        view = cuda_mma_sparse.view_of(packed, x.dtype)
        plan = cuda_mma_sparse.values_plan if isinstance(packed, nm.NMWeight) else cuda_mma.plan
        return f"cuda_mma_sparse {plan(view, batch, x.device)}"
    grid = dispatch._sparse_on_grid(x, packed)
    if grid is not None:
        return f"{kernel_name(grid, batch)} (grid view)"
    if isinstance(packed, bitmap.BitmapWeight) and cuda_mma_scatter.supported(x, packed):
        return "cuda_mma_scatter w{}c{}".format(*cuda_mma_scatter.plan(cuda_mma_scatter.view_of(packed, x.dtype), batch, x.device))
    if isinstance(packed, (spqr.SpQRWeight, lut.LUTWeight)):
        grid = extras_view.cached(packed).dense
        bits = packed.bits if isinstance(packed, lut.LUTWeight) else None
        return ("cuda_mma " + ("table" if bits else "scaled") if cuda_mma.form_supported(x, grid, bits) else "triton") + " + outliers"
    return "triton"


def packed_bytes(packed) -> int:
    return tensor_bytes({k: v for k, v in vars(packed).items() if isinstance(v, torch.Tensor)})


def print_and_keep(record: dict, records: list) -> None:
    """A probe's record: printed as a JSON line now, kept for `save_jsonl`."""
    print(json.dumps(record), flush=True)
    records.append(record)


def save_jsonl(path: str | None, records: list) -> None:
    """The records as JSON lines at `path` (nothing without one)."""
    if path:
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def copies_for(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 << 20)
    return max(4, min(64, -(-3 * l2 // max(nbytes, 1))))


def time_op(fn, args_list: list, reps: int = 30) -> float:
    """Microseconds per call: a CUDA graph calling fn once on each argument set, replayed `reps` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in args_list[:2]:
            fn(*args)  # warm up (compiles, workspaces) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in args_list:
            fn(*args)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(args_list))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s): the roofline used for %."""
    a, b = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"), torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    return 2 * a.numel() / time_op(lambda: b.copy_(a), [()] * 4, reps=10) / 1e3


def int4pack_peer(w: torch.Tensor, x_list):
    """torch._weight_int4pack_mm (tinygemm) on an int4 g128 quantization of w; None where unavailable."""
    rows, cols = w.shape
    wf = w.float().reshape(rows, cols // 128, 128)
    lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-6)
    codes = ((wf - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, cols)
    packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
    # tinygemm: w = (code - 8) * scale + zero with zero = lo + 8 * scale; [groups, out, 2]
    sz = torch.stack([scale.squeeze(-1), (lo + 8 * scale).squeeze(-1)], -1).transpose(0, 1).contiguous().bfloat16()
    return packed, sz


def cslt_peer(w: torch.Tensor):
    """cuSPARSELt 2:4 of w (random 2:4 mask) and its searched algorithm id; raises where unavailable."""
    rows, cols = w.shape
    mask = (torch.rand(rows, cols // 4, 4, device=w.device).argsort(-1) < 2).reshape(rows, cols)
    compressed = torch._cslt_compress(w * mask)
    alg = 0
    try:
        found = torch._cslt_sparse_mm_search(compressed, torch.randn(cols, 16, device=w.device, dtype=w.dtype))
        alg = int(found[0] if isinstance(found, (tuple, list)) else found)
    except Exception as error:  # older / newer signatures: the default algorithm
        print(f"cuSPARSELt algorithm search unavailable ({type(error).__name__}: {error}); alg_id 0", flush=True)
    return compressed, alg


def emit(record: dict, env: dict, out, records: list) -> None:
    records.append(record)
    print(json.dumps({k: v for k, v in record.items() if k != "all"}), flush=True)
    if out:
        out.write(json.dumps({**record, **env}) + "\n") and out.flush()


def peer_times(rows: int, cols: int, batches: list, env: dict, out, records: list, extra_peers: bool = True) -> dict:
    """Dense bf16 and the peers at every batch: {name: {batch: us}}, each recorded. `extra_peers`: also the
    separately installed ones (benchmarks/gpu_peers.py: humming-kernels, bitsandbytes NF4)."""
    dense_w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
    dense_copies = [dense_w] + [dense_w.clone() for _ in range(copies_for(dense_w.numel() * 2) - 1)]
    peers: dict[str, dict[int, float]] = {"dense_bf16": {}, "torch_int4pack_g128": {}, "cusparselt_2:4": {}}
    made, nbytes = {}, {"dense_bf16": rows * cols * 2, "torch_int4pack_g128": rows * cols * 17 // 32, "cusparselt_2:4": rows * cols * 9 // 8}
    for name, build in (("torch_int4pack_g128", lambda: int4pack_peer(dense_w, None)), ("cusparselt_2:4", lambda: cslt_peer(dense_w))):
        try:
            made[name] = build()
        except Exception as error:
            print(f"{name} unavailable: {type(error).__name__}: {error}", flush=True)
    packaged = gpu_peers.build_all(dense_w, copies_for) if extra_peers else {}
    for name, (_, _, size) in packaged.items():
        peers[name], nbytes[name] = {}, size
    for batch in batches:
        xs = [torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16) for _ in range(len(dense_copies))]
        peers["dense_bf16"][batch] = time_op(F.linear, list(zip(xs, dense_copies)))
        for name, op in made.items():
            try:
                if name == "torch_int4pack_g128":
                    p4 = [op] + [tuple(t.clone() for t in op) for _ in range(copies_for(op[0].numel() * op[0].element_size()) - 1)]
                    peers[name][batch] = time_op(lambda x, p, s: torch._weight_int4pack_mm(x, p, 128, s),
                                                 [(xs[i % len(xs)], *p) for i, p in enumerate(p4)])
                else:
                    (c, alg), xt = op, [torch.randn(cols, max(batch, 16), device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                    pc = [c] + [c.clone() for _ in range(copies_for(c.numel() * c.element_size()) - 1)]
                    peers[name][batch] = time_op(lambda c, x, a=alg: torch._cslt_sparse_mm(c, x, alg_id=a),
                                                 [(c, xt[i % 2]) for i, c in enumerate(pc)])
            except Exception as error:
                print(f"{name} failed at batch {batch}: {type(error).__name__}: {error}", flush=True)
        for name, (op, copies, _) in packaged.items():
            try:
                peers[name][batch] = time_op(op, [(xs[i % len(xs)], c) for i, c in enumerate(copies)])
            except Exception as error:
                print(f"{name} failed at batch {batch}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        for name, times in peers.items():
            if batch in times:
                emit({"format": name, "peer": True, "shape": [rows, cols], "batch": batch, "us": round(times[batch], 2),
                      "gbps": round((nbytes[name] + 2 * batch * (rows + cols)) / times[batch] / 1e3),
                      "bytes_per_weight": round(nbytes[name] / (rows * cols), 4),
                      "ratio_vs_dense": round(peers["dense_bf16"][batch] / times[batch], 3)}, env, out, records)
    return peers


def same_bits_peer(fmt: str, peers: dict, batch: int) -> tuple[str, float] | None:
    """The fastest peer storing the format's weight bits (int4: tinygemm, humming, NF4; int3/2/8: humming; SpQR and
    LUT codes of b bits: the b-bit peers; 2:4 bf16: cuSPARSELt): (name, us), or None."""
    found = re.search(r"(?:int|lut|spqr)(\d)", fmt)
    bits = int(found.group(1)) if found else None
    names = ["cusparselt_2:4"] if fmt == "nm_2:4_bf16" else [n for n in peers if bits is not None and gpu_peers.bits_of(n) == bits]
    timed = [(n, peers[n][batch]) for n in names if batch in peers.get(n, {})]
    return min(timed, key=lambda t: t[1]) if timed else None


def weight_copies(fmt: str, rows: int, cols: int, checked: bool, batches=()):
    """R copies of a random packed weight (`checked`: its kernels for `batches` compiled in parallel, then checked;
    SpQR / LUT: every copy's view built up front, outside the graph capture)."""
    packed = make(fmt, rows, cols, "cuda")
    op = op_for(packed)
    if checked:
        if tk.supports(packed):
            precompile([(torch.randn(b, cols, device="cuda", dtype=dt), None) for b in {*batches, 1, 4, 16}
                        for dt in (torch.bfloat16, torch.float32)], packed)
        bound = 2e-3 if isinstance(packed, spqr.SpQRWeight) else 1e-4  # SpQR's view rounds second-level statistics to fp16
        check(op, packed, (1, 4, 16), f"{fmt} {rows}x{cols}", bound)
    nbytes = packed_bytes(packed)
    copies = [packed] + [type(packed)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(packed).items()})
                         for _ in range(copies_for(nbytes) - 1)]
    for copy in copies:  # views built up front, outside the graph capture
        if isinstance(copy, (spqr.SpQRWeight, lut.LUTWeight)):
            x = torch.empty(1, cols, device="cuda", dtype=torch.bfloat16)
            grid, bits = extras_view.cached(copy).dense, copy.bits if isinstance(copy, lut.LUTWeight) else None
            if cuda_mma.form_supported(x, grid, bits):  # the tensor-core form of its grid the modules run
                cuda_mma.form_view_of(grid, bits, x.dtype)
        elif cuda_mma.shape_ok(copy):
            cuda_mma.view_of(copy)
        elif isinstance(copy, group_quant.GroupQuantWeight) and cuda_mma.scaled_shape_ok(copy):
            cuda_mma.view_of(copy, torch.bfloat16)
        elif isinstance(copy, sparse_quant.SparseQuantWeight) and cuda_mma_sparse.shape_ok(copy):
            cuda_mma_sparse.view_of(copy)
        elif isinstance(copy, nm.NMWeight) and cuda_mma_sparse.values_shape_ok(copy):
            cuda_mma_sparse.view_of(copy, torch.bfloat16)
        elif isinstance(copy, sparse_quant.SparseQuantWeight):  # its grid view (and that view's tensor-core form)
            dispatch.device_matmul(torch.zeros(1, cols, device="cuda", dtype=torch.bfloat16), copy)
        elif isinstance(copy, bitmap.BitmapWeight):
            triton_bitmap.view_of(copy)
            if cuda_mma_scatter.shape_ok(copy):
                cuda_mma_scatter.view_of(copy, torch.bfloat16)
    return copies, nbytes


def check(op, packed, batches, label: str, bound: float = 1e-4, fp32: bool = True) -> None:
    """op(x, packed) against the dequantized weight: relative error with bf16 (< 1e-2) and fp32 (< bound) activations
    (`fp32`: ops that take them)."""
    w = unpack(packed)
    for batch in batches:
        x = torch.randn(batch, w.shape[1], device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w.double().T
        err = ((op(x, packed).double() - ref).norm() / ref.norm()).item()
        err32 = ((op(x.float(), packed).double() - ref).norm() / ref.norm()).item() if fp32 else 0.0
        status = "ok" if err < 1e-2 and err32 < bound else "FAILED"
        print(f"check {label} batch {batch}: rel err bf16 {err:.1e} fp32 {err32:.1e} {status}", flush=True)


def candidates(packed, batch: int) -> list:
    """The sweep's grid for one weight and batch: FMA tiles at batch <= 4 (a lane: 4 code words / an index word a step, so
    block_k follows num_warps), dot tiles (BLOCK_N x warps, K step, stages; batch <= 4: N unpadded) and split-K where few programs."""
    C, args, out = tk.Config, tc.format_args(packed, packed.shape[1]), []
    if batch <= 4 and tc.fma_ok(args):
        lane = 128 * args["PER"] if args["FMT"] == tc.FMT_GROUP_QUANT else 32 * args["IPER"]
        tiles = ((4, 1, 4), (8, 1, 3), (8, 1, 4), (8, 1, 6), (16, 1, 4), (8, 2, 4), (16, 2, 4))
        out += [C(batch, bn, lane * warps, 1, warps, stages, "fma") for bn, warps, stages in tiles] + [C(batch, 16, lane, 2, 1, 4, "fma")]
    small = ((16, 1, 512, 4), (16, 1, 256, 4), (16, 1, 1024, 4), (32, 1, 512, 4), (32, 2, 512, 4), (16, 1, 512, 3), (64, 4, 256, 3))
    big = ((16, 1, 512, 4), (32, 2, 256, 4), (32, 2, 512, 3), (64, 4, 256, 3), (64, 4, 512, 3), (128, 4, 256, 3), (128, 8, 256, 3),
           (64, 4, 256, 4))
    generic = tc.launch_plan(args, C(16, 64, 256, 1, 4, 3, "dot"), batch, *packed.shape, 2)["fast"] != 1  # slow to compile: fewer
    for bn, warps, step, stages in (small if batch <= 4 else big)[::2 if generic else 1]:
        out.append(C(16 if batch > 4 else tc.pow2(batch), bn, step, 1, warps, stages, "dot"))
    if batch == 1 and tc.splitk_ok(args):  # the split-K GEMVs: rows a program, lanes (block_k), warps
        step = 2048 if args["FMT"] != tc.FMT_GROUP_QUANT else 256 * args["PER"]
        out += [C(1, bn, step * k, 1, warps, 1, "splitk") for bn, k, warps in ((4, 1, 2), (8, 1, 2), (4, 2, 4), (8, 2, 4), (2, 1, 2))]
    few = [(bn, w, split) for bn, w, split in ((64, 4, 2), (128, 4, 4)) if -(-packed.shape[0] // bn) < tc.sm_count(torch.device("cuda"))]
    return out + [C(16, bn, 256, split, w, 3, "dot") for bn, w, split in few if batch > 4]


def precompile(calls: list, packed) -> None:
    """Compile the kernel of every (x, config) in a thread pool (Triton's AsyncCompileMode); failures are left to the timing."""
    from triton.runtime._async_compile import AsyncCompileMode
    kernels = (tk._dot_kernel, tg._gq_gemv_kernel, tg._nm_gemv_kernel)
    originals = [k.run for k in kernels]
    for k, run in zip(kernels, originals):
        k.run = lambda *a, _run=run, grid=None, warmup=False, **kw: _run(*a, grid=grid, warmup=True, **kw)
    try:
        with AsyncCompileMode(ThreadPoolExecutor(max_workers=os.cpu_count() or 8), ignore_errors=True):
            for x, cfg in calls:
                tk.packed_matmul(x, packed, cfg)
    except Exception as error:  # sequential compiles then, in the timing
        print(f"  parallel compile stopped: {type(error).__name__}: {str(error)[:200]}", flush=True)
    finally:
        for k, run in zip(kernels, originals):
            k.run = run


def mma_op(x: torch.Tensor, packed) -> torch.Tensor:
    """The tensor-core kernel, its scaled form where the weight needs it (SpQR: the grid part of its view)."""
    if isinstance(packed, spqr.SpQRWeight):
        return extras_view.matmul(x, extras_view.cached(packed), cuda_mma.matmul, triton_outliers.add_corrections)
    if isinstance(packed, lut.LUTWeight):  # the table form
        def table(x2: torch.Tensor, codes: views.LUTCodes) -> torch.Tensor:
            return cuda_mma.form_matmul(x2, codes, packed.bits)

        return extras_view.matmul(x, extras_view.cached(packed), table, triton_outliers.add_corrections)
    return cuda_mma.matmul(x, packed)


def scatter_op(x, packed):
    return cuda_mma_scatter.matmul(x, packed)


def fused_op(x: torch.Tensor, packed) -> torch.Tensor:
    """A SpQR / LUT weight's grid form, permutation and outliers in one launch."""
    return cuda_mma_extras.matmul(x, packed)


def run_format(fmt, rows, cols, batches, peers, bandwidth, env, out, records, sweep: bool) -> None:
    """FORMAT@triton: the format with COMPRESS_GPU_KERNEL=triton (its Triton kernels where the tensor-core ones are the
    default), side by side in the same run; FORMAT@wide: with the exact tensor-core form dispatched at 17-64 rows."""
    if fmt.endswith("@wide"):  # the exact tensor-core form dispatched at 17-64 rows too (cuda_mma.DISPATCH_WIDE)
        previous_wide, cuda_mma.DISPATCH_WIDE = cuda_mma.DISPATCH_WIDE, True
        try:
            return _run_format(fmt[: -len("@wide")], rows, cols, batches, peers, bandwidth, env, out, records, sweep, "@wide")
        finally:
            cuda_mma.DISPATCH_WIDE = previous_wide
    if fmt.endswith("@fused@scaled"):  # one launch on the scaled form of the view's grid instead of SpQR's compact form
        previous_compact, cuda_mma_extras.COMPACT = cuda_mma_extras.COMPACT, False
        try:
            return _run_format(fmt[: -len("@scaled")], rows, cols, batches, peers, bandwidth, env, out, records, sweep, "@scaled")
        finally:
            cuda_mma_extras.COMPACT = previous_compact
    if fmt.endswith("@triton"):
        previous = os.environ.get(dispatch.ENV)
        os.environ[dispatch.ENV] = "triton"
        try:
            return _run_format(fmt[: -len("@triton")], rows, cols, batches, peers, bandwidth, env, out, records, sweep, "@triton")
        finally:
            os.environ.pop(dispatch.ENV) if previous is None else os.environ.update({dispatch.ENV: previous})
    return _run_format(fmt, rows, cols, batches, peers, bandwidth, env, out, records, sweep)


def _run_format(fmt, rows, cols, batches, peers, bandwidth, env, out, records, sweep: bool, suffix: str = "") -> None:
    fmt, _, forced = fmt.partition("@")
    if (forced or suffix or fmt in VIEW_FORMATS or fmt.startswith("bitmap")) and sweep:
        return  # the sweep's grid holds the forced kernel already; the views' kernels are swept as their own formats
    copies, nbytes = weight_copies(fmt, rows, cols, not sweep, batches)
    scatter_all = forced == "scatter" or cuda_mma_scatter.ALL_BATCHES
    if isinstance(copies[0], bitmap.BitmapWeight) and not scatter_all and max(batches) > triton_bitmap.MAX_BATCH:
        print(f"{fmt}: batches above {triton_bitmap.MAX_BATCH} decode the weight (not in a CUDA graph): not timed", flush=True)
        batches = [b for b in batches if b <= triton_bitmap.MAX_BATCH]
    if forced == "widened":
        copies = [views.widen(c) for c in copies]
        for copy in copies:
            cuda_mma.view_of(copy)
        nbytes, fmt, forced = packed_bytes(copies[0]), f"{fmt}@widened", ""
    elif forced == "mma":
        for copy in copies:  # the scaled and table forms built up front, outside the graph capture
            grid = extras_view.cached(copy).dense if fmt in VIEW_FORMATS else copy
            cuda_mma.form_view_of(grid, copy.bits if isinstance(copy, lut.LUTWeight) else None, torch.bfloat16)
        check(mma_op, copies[0], (1, 4, 16), f"{fmt}@mma", fp32=False)
        fmt, batches = f"{fmt}@mma", [b for b in batches if b <= cuda_mma.MAX_BATCH]
    elif forced == "fused":  # SpQR / LUT in one launch: forms and extras built up front, outside the graph capture
        for copy in copies:
            cuda_mma_extras.prepared(copy, torch.bfloat16)
        check(fused_op, copies[0], (1, 4, 8), f"{fmt}@fused", fp32=False)
        fmt, batches = f"{fmt}@fused", [b for b in batches if b <= mma_extras_layout.MAX_OUTLIER_ROWS]
    elif forced == "scatter":  # bitmap weights on the shared-memory scatter kernel
        for copy in copies:
            cuda_mma_scatter.view_of(copy, torch.bfloat16)
        check(scatter_op, copies[0], (1, 4, 16, 64), f"{fmt}@scatter", fp32=False)
        fmt = f"{fmt}@scatter"  # every batch (64 rows a launch)
    elif forced == "split":  # bitmap weights as a 2:4 part on the sparse tensor cores plus outliers
        for copy in copies:
            cuda_mma_sparse.view_of(nm_split.cached(copy).dense, torch.bfloat16)
        check(nm_split.matmul, copies[0], (1, 4, 16), f"{fmt}@split", fp32=False)
        print(f"{fmt}@split: outliers {nm_split.overflow_share(copies[0]):.2%} of the weights", flush=True)
        fmt, batches = f"{fmt}@split", [b for b in batches if b <= cuda_mma.MAX_BATCH]
    elif forced:
        check(lambda x, p: tk.packed_matmul(x, p, FORCED[forced]), copies[0], (1,), FORCED[forced].kernel)
        fmt, batches = f"{fmt}@{forced}", [1]
    for batch in batches:
        xs = [torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        arg_list = [(xs[i % 4], p) for i, p in enumerate(copies)]
        kernel_weight = extras_view.cached(copies[0]).dense if fmt in VIEW_FORMATS else copies[0]  # the view's grid: its kernel
        default = tc.default_config(batch, kernel_weight, torch.device("cuda")) if tk.supports(kernel_weight) else "triton_bitmap"
        dense = peers["dense_bf16"][batch]
        best_peer = min(t[batch] for t in peers.values() if batch in t)
        total = nbytes + 2 * batch * (rows + cols)
        if not sweep:
            default = FORCED.get(forced, default)
            if forced in FORCED_KERNELS:
                us = time_op({"mma": mma_op, "scatter": scatter_op, "split": nm_split.matmul, "fused": fused_op}[forced], arg_list)
            else:
                us = time_op(lambda x, p: tk.packed_matmul(x, p, FORCED[forced]) if forced else op_for(p)(x, p), arg_list)
            same = same_bits_peer(fmt, peers, batch)
            emit({"format": fmt + suffix, "shape": [rows, cols], "batch": batch, "us": round(us, 2), "gbps": round(total / us / 1e3),
                  "pct_copy_bw": round(100 * total / us / 1e3 / bandwidth, 1), "bytes_per_weight": round(nbytes / (rows * cols), 4),
                  "ratio_vs_dense": round(dense / us, 3), "ratio_vs_best_peer": round(best_peer / us, 3),
                  **({"same_bits_peer": same[0], "ratio_vs_same_bits_peer": round(same[1] / us, 3)} if same else {}),
                  "config": str(default), "kernel": FORCED_KERNELS.get(forced, "triton") if forced else kernel_name(copies[0], batch)},
                 env, out, records)
            continue
        configs = [default] + [c for c in candidates(copies[0], batch) if c != default]
        precompile([(xs[0], c) for c in configs], copies[0])
        timed = []
        for cfg in configs:
            try:
                timed.append((time_op(lambda x, p, c=cfg: tk.packed_matmul(x, p, c), arg_list, reps=7), cfg))
            except Exception as error:
                print(f"  {cfg}: {type(error).__name__}: {str(error)[:200]}", flush=True)
        timed.sort(key=lambda t: t[0])
        us, cfg = timed[0]
        default_us = next(t for t, c in timed if c == default) if any(c == default for _, c in timed) else float("nan")
        emit({"format": fmt, "shape": [rows, cols], "batch": batch, "sweep": True, "us": round(us, 2), "best_us": round(us, 2),
              "gbps": round(total / us / 1e3), "ratio_vs_dense": round(dense / us, 3), "ratio_vs_best_peer": round(best_peer / us, 3),
              "best_config": str(cfg), "default_us": round(default_us, 2), "default_ratio_vs_dense": round(dense / default_us, 3),
              "config": str(default), "all": [[round(t, 2), str(c)] for t, c in timed]}, env, out, records)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help=f"out x in, comma-separated (default 4096x4096,14336x4096,4096x14336; --sweep: {SWEEP_SHAPES})")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--sweep", action="store_true", help="time a grid of configurations per format, shape and sweep batch")
    parser.add_argument("--sweep-batches", default="1,16")
    parser.add_argument("--json", help="write one JSON record per (format, shape, batch) to this file")
    parser.add_argument("--no-extra-peers", action="store_true", help="skip humming-kernels and bitsandbytes")
    parser.add_argument("--plan-prefetch", type=int, default=None, help="the tensor-core plan's L2 prefetch (cuda_mma.PLAN_PREFETCH)")
    parser.add_argument("--one-launch", action="store_true", help="SpQR / LUT layers in one launch (cuda_mma_extras.DISPATCH)")
    parser.add_argument("--gather-in-kernel-max-rows", type=int, default=None,
                        help="rows up to which one launch gathers the activations in the kernel (cuda_mma_extras.GATHER_IN_KERNEL_MAX_ROWS)")
    parser.add_argument("--transposed-walk", action="store_true",
                        help="SpQR / LUT outliers at 9-16 rows walked on a transposed copy of the activations (cuda_mma_extras.TRANSPOSED_WALK)")
    parser.add_argument("--wide-tables", action="store_true", help="4-bit LUT codes on the wide table form (mma_lut_layout.WIDE_TABLES)")
    args = parser.parse_args(argv)
    if args.plan_prefetch is not None:
        cuda_mma.PLAN_PREFETCH = args.plan_prefetch
    cuda_mma_extras.DISPATCH = args.one_launch or cuda_mma_extras.DISPATCH
    mma_lut_layout.WIDE_TABLES = args.wide_tables or mma_lut_layout.WIDE_TABLES
    cuda_mma_extras.TRANSPOSED_WALK = args.transposed_walk or cuda_mma_extras.TRANSPOSED_WALK
    if args.gather_in_kernel_max_rows is not None:
        cuda_mma_extras.GATHER_IN_KERNEL_MAX_ROWS = args.gather_in_kernel_max_rows
    import triton
    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "command": " ".join(["python", *sys.argv]),
           "plan_prefetch": cuda_mma.PLAN_PREFETCH, "one_launch": cuda_mma_extras.DISPATCH, "wide_tables": mma_lut_layout.WIDE_TABLES,
           "gather_in_kernel_max_rows": cuda_mma_extras.GATHER_IN_KERNEL_MAX_ROWS, "transposed_walk": cuda_mma_extras.TRANSPOSED_WALK}
    bandwidth = copy_bandwidth()
    env["copy_gbps"] = round(bandwidth)
    print(json.dumps(env), flush=True)
    shapes = args.shapes or (SWEEP_SHAPES if args.sweep else "4096x4096,14336x4096,4096x14336")
    batches = [int(b) for b in (args.sweep_batches if args.sweep else args.batches).split(",")]
    records: list = []
    start = time.time()
    out = open(args.json, "w") if args.json else None  # noqa: SIM115 - written record by record, so a cut-off run keeps its part
    for rows, cols in (tuple(int(v) for v in shape.split("x")) for shape in shapes.split(",")):
        peers = peer_times(rows, cols, batches, env, out, records, extra_peers=not (args.sweep or args.no_extra_peers))
        for fmt in args.formats.split(","):
            run_format(fmt, rows, cols, batches, peers, bandwidth, env, out, records, args.sweep)
    print(f"\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, copy {env['copy_gbps']} GB/s")
    print(f"{'format':22} {'shape':>11} {'batch':>5} {'us':>8} {'GB/s':>6} {'x dense':>8} {'x peer':>7} {'x bits':>7} {'default us':>10}  best")
    for r in sorted(records, key=lambda r: (r["format"], r["batch"])) if args.sweep else records:  # sweep: by (format, batch)
        print(f"{r['format']:22} {r['shape'][0]:>5}x{r['shape'][1]:<5} {r['batch']:>5} {r['us']:>8.2f} {r['gbps']:>6} {r['ratio_vs_dense']:>8.2f} "
              f"{r.get('ratio_vs_best_peer', float('nan')):>7.2f} {r.get('ratio_vs_same_bits_peer', float('nan')):>7.2f} "
              f"{r.get('default_us', float('nan')):>10.2f}  {r.get('best_config', '')}")
    print(f"{time.time() - start:.0f} s", flush=True)
    if out:
        out.close()


if __name__ == "__main__":
    main()
