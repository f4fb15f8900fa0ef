"""The CPU kernels (compress.kernels) against dense F.linear and what a user would pick instead, in one
process: y = x @ W.T for decoding batches (1 and 16 rows), all cores (torch.get_num_threads(), and as
many onnxruntime intra-op threads), each operand rotated among enough distinct copies that one pass over
them is at least twice the last-level cache (read from /sys), so the weights come from memory as in a
real model rather than from cache.

Peers (one function each, `peer_*`): dense fp32 and dense bf16 F.linear; torch CSR and BSR (fp32, 16x16
blocks) at 50% and 70% sparsity; torch._weight_int4pack_mm_for_cpu (int4 g128, bf16 x); dynamic int8
(torch.ao.quantization.quantize_dynamic, fp32 x); onnxruntime's com.microsoft MatMulNBits (int4, block
128, fp32 x; accuracy_level 0 = fp32 compute, 4 = int8 compute, the one ORT GenAI uses on CPU), one
single-node session per weight copy.
Ours (the FORMATS table), bf16 activations: nm 2:4 bf16, bitmap 50% / 70% bf16, group_quant int4 /
int8 / int3 g128, sparse_quant 2:4 + int4 g128 and 70% bitmap + int8 g128, spqr 3-bit g16 with 3-bit
second-level statistics and ~1% outliers (act-order), lut 3-bit with ~0.5% outliers (SqueezeLLM).

Each of ours is compared with the fastest of its peers (PEERS): CSR/BSR of the same sparsity for the
sparse bf16 ones, int4pack or MatMulNBits for int4 and 2:4 + int4, dynamic int8 for int8 and bitmap +
int8, dense bf16 for the 3-bit ones (no torch 3-bit kernel); the 3-bit ones are also compared with the
int4 peers (the nearest "small weights" kernels: ALSO). Ratios are speedups (time of the other / time of
the row; above 1 = faster). Peers run only the timing (their weights are random, not ours).
gb_per_s = (weight operand bytes + x + y) / time: the bandwidth the row achieved.

    python benchmarks/cpu_kernels.py --quick          # 4096x4096, batch 1, under a minute
    python benchmarks/cpu_kernels.py                  # 4096x4096, 11008x4096, 4096x11008 (out x in), batch 1 and 16
    python benchmarks/cpu_kernels.py --json > cpu_kernels.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.formats import bitmap, lut, nm, sparse_quant, spqr
from compress.formats import group_quant as gq
from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight
from compress.kernels import build, cpu
from compress.methods.sparsity import prune_mask

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
GROUP = 128
INT4_PEERS = ("torch_int4pack", "ort_matmulnbits_int8", "ort_matmulnbits_fp32")
PEERS = {
    "nm_2:4": ("torch_csr_50%", "torch_bsr_50%"),
    "bitmap_50%": ("torch_csr_50%", "torch_bsr_50%"),
    "bitmap_70%": ("torch_csr_70%", "torch_bsr_70%"),
    "int4_g128": INT4_PEERS,
    "sq_2:4+int4_g128": INT4_PEERS,
    "int8_g128": ("torch_dynamic_int8",),
    "sq_70%+int8_g128": ("torch_dynamic_int8",),
    "int3_g128": ("dense_bf16",),
    "spqr_3b_g16_qq3": ("dense_bf16",),
    "lut_3b": ("dense_bf16",),
}
ALSO = {name: INT4_PEERS for name in ("int3_g128", "spqr_3b_g16_qq3", "lut_3b")}


@dataclasses.dataclass
class Row:
    """How to build one operand (called once, then copies are cloned), call it, and x's dtype."""

    make: Callable[[], object]
    call: Callable[[torch.Tensor, object], object]
    x_dtype: torch.dtype


class Maker:
    """Random operands of one shape [out, inp]."""

    def __init__(self, out: int, inp: int, gen: torch.Generator):
        self.out, self.inp, self.gen = out, inp, gen
        self.groups = inp // GROUP

    def dense(self) -> torch.Tensor:
        return torch.randn(self.out, self.inp, generator=self.gen)

    def keep(self, density: float) -> torch.Tensor:
        return torch.rand(self.out, self.inp, generator=self.gen) < density

    def keep_2of4(self) -> torch.Tensor:
        return prune_mask(torch.rand(self.out, self.inp, generator=self.gen), 0.5, "2:4")

    def codes(self, bits: int) -> torch.Tensor:
        return torch.randint(0, 2**bits, (self.out, self.inp), generator=self.gen)

    def stats(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (torch.rand(self.out, self.groups, generator=self.gen) * 0.01).half().float()
        return scale, torch.randint(0, 2**bits, (self.out, self.groups), generator=self.gen).float()

    def outliers(self, fraction: float) -> Outliers:
        return Outliers.from_mask(self.dense(), self.keep(fraction))


# ---------------------------------------------------------------- peers: what a user would pick instead

def peer_dense(m: Maker, dtype: torch.dtype) -> Row:
    return Row(lambda: m.dense().to(dtype), lambda x, w: F.linear(x, w), dtype)


def peer_torch_csr(m: Maker, density: float) -> Row:
    return Row(lambda: (m.dense() * m.keep(density)).to_sparse_csr(), lambda x, w: (w @ x.T).T, torch.float32)


def peer_torch_bsr(m: Maker, density: float) -> Row:
    def make():
        blocks = torch.rand(m.out // 16, m.inp // 16, generator=m.gen) < density
        return (m.dense() * blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)).to_sparse_bsr((16, 16))

    return Row(make, lambda x, w: (w @ x.T).T, torch.float32)


def peer_torch_int4pack(m: Maker) -> Row:
    def make():
        packed = torch._convert_weight_to_int4pack_for_cpu(m.codes(4).int(), 1)
        return packed, (torch.rand(m.groups, m.out, 2, generator=m.gen) * 0.01).bfloat16()

    return Row(make, lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], GROUP, w[1]), torch.bfloat16)


def peer_torch_dynamic_int8(m: Maker) -> Row:
    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            linear = torch.nn.Linear(m.inp, m.out, bias=False)
            return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)

    return Row(make, lambda x, w: w(x), torch.float32)


@dataclasses.dataclass
class OrtLinear:
    """A one-node onnxruntime session computing y = x @ W.T with com.microsoft MatMulNBits; a copy
    is a new session (its own weight buffers)."""

    model: bytes
    nbytes: int

    def __post_init__(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # sessions take turns: a spinning pool of one would steal the cores from the next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor):
        return self.session.run(None, {"A": x.numpy()})[0]


def peer_ort_matmulnbits(m: Maker, accuracy_level: int) -> Row:
    def make():
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        codes = m.codes(4).to(torch.uint8).numpy()
        weight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(m.out, m.groups, GROUP // 2)
        scales = (torch.rand(m.out, m.groups, generator=m.gen) * 0.01).numpy().reshape(-1)
        zeros = m.codes(4)[:, : m.groups].to(torch.uint8).numpy()
        zeros = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1)
        node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                                K=m.inp, N=m.out, bits=4, block_size=GROUP, accuracy_level=accuracy_level)
        initializers = [numpy_helper.from_array(np.ascontiguousarray(a), name) for a, name in
                        ((weight, "B"), (scales, "scales"), (zeros, "zero_points"))]
        graph = helper.make_graph([node], "matmulnbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", m.inp])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", m.out])], initializer=initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        return OrtLinear(model.SerializeToString(), weight.nbytes + scales.nbytes + zeros.nbytes)

    return Row(make, lambda x, w: w(x), torch.float32)


def peers(m: Maker) -> dict[str, Row]:
    return {
        "dense_fp32": peer_dense(m, torch.float32),
        "dense_bf16": peer_dense(m, torch.bfloat16),
        "torch_csr_50%": peer_torch_csr(m, 0.5),
        "torch_bsr_50%": peer_torch_bsr(m, 0.5),
        "torch_csr_70%": peer_torch_csr(m, 0.3),
        "torch_bsr_70%": peer_torch_bsr(m, 0.3),
        "torch_int4pack": peer_torch_int4pack(m),
        "ort_matmulnbits_fp32": peer_ort_matmulnbits(m, 0),
        "ort_matmulnbits_int8": peer_ort_matmulnbits(m, 4),
        "torch_dynamic_int8": peer_torch_dynamic_int8(m),
    }


# ---------------------------------------------------------------- ours: the packed formats

def spqr_3bit(m: Maker) -> spqr.SpQRWeight:
    """SpQR's recommended configuration: 3-bit g16, 3-bit statistics in groups of 16 rows, ~1% outliers, act-order."""
    def second_level(high: float) -> QuantizedStatistic:
        outer = (m.out // 16, -(-m.inp // 16))
        step = (torch.rand(outer, generator=m.gen) * high / 8).half()
        return QuantizedStatistic(torch.randint(0, 8, (m.out, outer[1]), generator=m.gen), 3, 16, step, torch.zeros(outer).half())

    q = QuantizedWeight((m.out, m.inp), 3, 16, m.codes(3), second_level(0.02), second_level(7.0), m.outliers(0.01),
                        perm=torch.randperm(m.inp, generator=m.gen))
    return spqr.from_quantized(q)


def lut_3bit(m: Maker) -> lut.LUTWeight:
    """SqueezeLLM 3-bit: a table of 8 values per row, 0.5% outliers."""
    table = (torch.randn(m.out, 8, generator=m.gen) * 0.02).half()
    return lut.from_quantized(QuantizedWeight((m.out, m.inp), 3, m.inp, m.codes(3), None, None, m.outliers(0.005), lut=table))


def pruned_bf16(m: Maker, density: float) -> bitmap.BitmapWeight:
    keep = m.keep(density)
    return bitmap.pack((m.dense() * keep).bfloat16().float(), keep)


def formats(m: Maker) -> dict[str, Callable[[], object]]:
    """FORMATS: name -> maker of the packed weight (all run by cpu.packed_matmul on bf16 x)."""
    def nm_2of4():
        keep = m.keep_2of4()
        return nm.pack((m.dense() * keep).bfloat16().float(), keep, 2, 4)

    return {
        "nm_2:4": nm_2of4,
        "bitmap_50%": lambda: pruned_bf16(m, 0.5),
        "bitmap_70%": lambda: pruned_bf16(m, 0.3),
        "int4_g128": lambda: gq.pack(m.codes(4), *m.stats(4), 4, GROUP),
        "int8_g128": lambda: gq.pack(m.codes(8), *m.stats(8), 8, GROUP),
        "int3_g128": lambda: gq.pack(m.codes(3), *m.stats(3), 3, GROUP),
        "sq_2:4+int4_g128": lambda: sparse_quant.pack(m.keep_2of4(), m.codes(4), *m.stats(4), 4, GROUP, pattern="2:4"),
        "sq_70%+int8_g128": lambda: sparse_quant.pack(m.keep(0.3), m.codes(8), *m.stats(8), 8, GROUP),
        "spqr_3b_g16_qq3": lambda: spqr_3bit(m),
        "lut_3b": lambda: lut_3bit(m),
    }


def rows(out: int, inp: int, gen: torch.Generator) -> dict[str, Row]:
    """Every row of one shape, peers first (ours are compared with their times)."""
    m = Maker(out, inp, gen)
    return {**peers(m), **{name: Row(make, cpu.packed_matmul, torch.bfloat16) for name, make in formats(m).items()}}


# ---------------------------------------------------------------- measuring

def llc_bytes() -> tuple[int, str]:
    """The largest cache level's size (bytes) and where it was read."""
    best, where = 0, "unknown (assumed 32 MiB)"
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            level = (index / "level").read_text().strip()
        except OSError:
            continue
        size = int(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]] if text[-1] in "KMG" else int(text)
        if size > best:
            best, where = size, f"L{level} {text} ({index}/size)"
    return (best or 32 * 2**20), where


def clone(obj):
    """A copy with its own tensors (a new session for onnxruntime)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, OrtLinear):
        return OrtLinear(obj.model, obj.nbytes)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: clone(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if isinstance(getattr(obj, f.name), torch.Tensor)})
    if isinstance(obj, tuple):
        return tuple(clone(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        return copy.deepcopy(obj)
    return obj


def operand_bytes(obj) -> int:
    """Bytes a call reads for its weight operand (all tensors of a packed format, indices and values of a sparse one)."""
    if isinstance(obj, torch.Tensor):
        if obj.layout in (torch.sparse_csr, torch.sparse_bsr):
            return sum(operand_bytes(t) for t in (obj.crow_indices(), obj.col_indices(), obj.values()))
        return obj.numel() * obj.element_size()
    if isinstance(obj, OrtLinear):
        return obj.nbytes
    if dataclasses.is_dataclass(obj):
        return sum(operand_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj) if isinstance(getattr(obj, f.name), torch.Tensor))
    if isinstance(obj, tuple):
        return sum(operand_bytes(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        weight = obj[0].weight()
        return weight.numel() + 8 * weight.shape[0]  # int8 codes, one byte each, and a scale and zero point per row
    return 0


def measure(call, operands: list, min_seconds: float) -> tuple[float, float]:
    """(median, best) over passes of the mean time of one call, each pass calling once per operand copy."""
    for operand in operands:  # warm-up pass
        call(operand)
    passes: list[float] = []
    started = time.perf_counter()
    while len(passes) < 3 or (time.perf_counter() - started < min_seconds and len(passes) < 200):
        begin = time.perf_counter()
        for operand in operands:
            call(operand)
        passes.append((time.perf_counter() - begin) / len(operands))
    return statistics.median(passes), min(passes)


def ratios(times: dict, names, batch: int, seconds: float) -> dict[str, float]:
    return {name: times[(name, batch)] / seconds for name in names if (name, batch) in times}


def wanted(name: str, only: set[str] | None) -> bool:
    """With --only: the named formats, their peers and the dense rows."""
    needed = {"dense_fp32", "dense_bf16"} | set(only or ()) | {p for o in only or () for p in PEERS.get(o, ()) + ALSO.get(o, ())}
    return not only or name in needed


def run(shapes, batches, min_seconds: float, as_json: bool, only: set[str] | None = None) -> list[dict]:
    llc, where = llc_bytes()
    threads = torch.get_num_threads()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if as_json else (lambda *a: print(*a, flush=True))
    kernels = build._build_name(build._sources()[1])  # changes with every byte of kernels/cpu/
    say(f"threads {threads}; last-level cache {where}; kernels: {build.cpu_features()} ({kernels}); torch {torch.__version__}")
    say("times: median (and best) over passes of the mean per call; ratios from the medians")
    gen = torch.Generator().manual_seed(0)
    records = []
    for out, inp in shapes:
        times: dict[tuple[str, int], float] = {}
        for name, row in rows(out, inp, gen).items():
            if not wanted(name, only):
                continue
            try:
                first = row.make()
                copies = max(1, math.ceil(2 * llc / max(operand_bytes(first), 1)))
                operands = [first] + [clone(first) for _ in range(copies - 1)]
            except Exception as error:  # a peer this build lacks (torch op, onnxruntime)
                say(f"{name}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
                continue
            nbytes = operand_bytes(first)
            for batch in batches:
                x = torch.randn(batch, inp, generator=gen).to(row.x_dtype)
                try:
                    seconds, best = measure(lambda w, x=x, call=row.call: call(x, w), operands, min_seconds)
                except Exception as error:
                    say(f"{name} batch {batch}: failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
                    continue
                times[(name, batch)] = seconds
                vs_peers = ratios(times, PEERS.get(name, ()), batch, seconds)
                peer = min(vs_peers, key=lambda p: times[(p, batch)], default=None)  # the fastest peer
                moved = nbytes + batch * (inp + out) * x.element_size()
                record = {"format": name, "shape": [out, inp], "batch": batch, "seconds": seconds, "seconds_best": best,
                          "ratio_vs_dense_fp32": times.get(("dense_fp32", batch), math.nan) / seconds,
                          "ratio_vs_dense_bf16": times.get(("dense_bf16", batch), math.nan) / seconds,
                          "ratio_vs_peer": vs_peers.get(peer), "peer": peer,
                          "ratio_vs_peers": {**vs_peers, **ratios(times, ALSO.get(name, ()), batch, seconds)},
                          "weight_bytes": nbytes, "bytes_moved": moved, "gb_per_s": moved / seconds / 1e9,
                          "copies": len(operands), "activations": str(row.x_dtype).removeprefix("torch."), "threads": threads, "kernels": kernels,
                          "load_average_1min": os.getloadavg()[0]}
                records.append(record)
                if as_json:
                    print(json.dumps(record), flush=True)
                else:
                    vs_peer = f"{record['ratio_vs_peer']:6.2f}x vs {peer}" if peer else ""
                    print(f"{out:>5}x{inp:<5} b{batch:<2} {name:20s} {seconds * 1e3:8.3f} ms (best {best * 1e3:7.3f}) "
                          f"{nbytes / 2**20:6.1f} MiB x{len(operands):<2} {record['gb_per_s']:5.1f} GB/s "
                          f"{record['ratio_vs_dense_fp32']:6.2f}x vs dense fp32 {vs_peer}")
            del operands, first
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4096x4096, batch 1 only (under a minute)")
    parser.add_argument("--json", action="store_true", help="one JSON record per (format, shape, batch) on stdout")
    parser.add_argument("--min-seconds", type=float, default=None, help="time spent per measurement (default 0.3, --quick 0.1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, all cores)")
    parser.add_argument("--only", nargs="*", default=None, help="these formats (and their peers) only")
    parser.add_argument("--shapes", default=None, help="comma-separated OUTxIN shapes instead of the three defaults, e.g. 4096x11008")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif torch.get_num_threads() != (os.cpu_count() or 1):
        print(f"note: torch uses {torch.get_num_threads()} threads of {os.cpu_count()} cores", file=sys.stderr)
    if not build.kernels_available():
        print(f"note: the compiled kernels are unavailable ({build.unavailable_reason()}): ours run the torch reference", file=sys.stderr)
    shapes, batches = (SHAPES[:1], [1]) if args.quick else (SHAPES, [1, 16])
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    run(shapes, batches, args.min_seconds or (0.1 if args.quick else 0.3), args.json, set(args.only) if args.only else None)


if __name__ == "__main__":
    main()
