"""The CPU kernels (compress.kernels) against dense F.linear and torch's own sparse and quantized CPU
paths, in one process: y = x @ W.T for decoding batches (1 and 16 rows), all cores
(torch.get_num_threads()), each operand rotated among enough distinct copies that one pass over them is
at least twice the last-level cache (read from /sys), so the weights come from memory as in a real
model rather than from cache.

Rows: dense fp32 and dense bf16 F.linear; torch CSR (fp32, 50% unstructured) and BSR (fp32, 50% of
16x16 blocks kept); torch._weight_int4pack_mm_for_cpu (int4, group 128, bf16 x); dynamic int8
(torch.ao.quantization.quantize_dynamic, fp32 x); and ours, with bf16 activations: nm 2:4 bf16, bitmap
50% bf16, group_quant int4 / int8 / int3 group 128, sparse_quant 2:4 + int4 group 128. Each of ours is
compared with its peer: CSR for the sparse ones, int4pack for int4 and 2:4 + int4, dynamic int8 for
int8, dense bf16 for int3. Ratios are speedups (time of the other / time of the row; above 1 = faster).
Peers run only the timing (their weights are random, not the same numbers as ours).

    python benchmarks/cpu_kernels.py --quick          # 4096x4096, batch 1, well under a minute
    python benchmarks/cpu_kernels.py                  # 4096x4096, 11008x4096, 4096x11008 (out x in), batch 1 and 16
    python benchmarks/cpu_kernels.py --json > cpu_kernels.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.formats import bitmap, nm, sparse_quant
from compress.formats import group_quant as gq
from compress.kernels import build, cpu

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
PEERS = {"nm_2:4": "torch_csr", "bitmap_50%": "torch_csr", "int4_g128": "torch_int4pack", "sq_2:4+int4_g128": "torch_int4pack",
         "int8_g128": "torch_dynamic_int8", "int3_g128": "dense_bf16", "spqr_3b_g16_qq3": "torch_int4pack", "lut_3b": "torch_int4pack"}


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


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _clone(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if isinstance(getattr(obj, f.name), torch.Tensor)})
    if isinstance(obj, tuple):
        return tuple(_clone(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        import copy

        return copy.deepcopy(obj)
    return obj


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


def weights(out: int, inp: int, gen: torch.Generator) -> dict:
    """Makers of every operand for one shape (each called once, then cloned)."""
    dense = lambda: torch.randn(out, inp, generator=gen)  # noqa: E731
    half = torch.rand(out, inp, generator=gen) < 0.5
    groups = inp // 128

    def mask24():
        from compress.methods.sparsity import prune_mask

        return prune_mask(torch.rand(out, inp, generator=gen), 0.5, "2:4")

    def stats(bits):
        return (torch.rand(out, groups, generator=gen) * 0.01).half().float(), torch.randint(0, 2**bits, (out, groups), generator=gen).float()

    def codes(bits):
        return torch.randint(0, 2**bits, (out, inp), generator=gen)

    def int4pack():
        packed = torch._convert_weight_to_int4pack_for_cpu(codes(4).int(), 1)
        return packed, (torch.rand(groups, out, 2, generator=gen) * 0.01).bfloat16()

    def dynamic_int8():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            linear = torch.nn.Linear(inp, out, bias=False)
            return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)

    def bsr():
        blocks = torch.rand(out // 16, inp // 16, generator=gen) < 0.5
        return (dense() * blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)).to_sparse_bsr((16, 16))

    def nm24():
        mask = mask24()
        return nm.pack((dense() * mask).bfloat16().float(), mask, 2, 4)

    def sq24():
        return sparse_quant.pack(mask24(), codes(4), *stats(4), 4, 128, pattern="2:4")

    def outliers(fraction):
        from compress.formats.outliers import Outliers

        return Outliers.from_mask(dense(), torch.rand(out, inp, generator=gen) < fraction)

    def spqr3():  # SpQR's recommended configuration: 3-bit g16, 3-bit statistics in groups of 16 rows, ~1% outliers, act-order
        from compress.formats import spqr
        from compress.formats.quantized import QuantizedStatistic, QuantizedWeight

        def second_level(high):
            outer = (out // 16, -(-inp // 16))
            step = (torch.rand(outer, generator=gen) * high / 8).half()
            return QuantizedStatistic(torch.randint(0, 8, (out, outer[1]), generator=gen), 3, 16, step, torch.zeros(outer).half())

        q = QuantizedWeight((out, inp), 3, 16, codes(3), second_level(0.02), second_level(7.0), outliers(0.01),
                            perm=torch.randperm(inp, generator=gen))
        return spqr.from_quantized(q)

    def lut3():  # SqueezeLLM 3-bit with 0.5% outliers
        from compress.formats import lut
        from compress.formats.quantized import QuantizedWeight

        table = (torch.randn(out, 8, generator=gen) * 0.02).half()
        return lut.from_quantized(QuantizedWeight((out, inp), 3, inp, codes(3), None, None, outliers(0.005), lut=table))

    return {
        "dense_fp32": (dense, lambda x, w: F.linear(x, w), torch.float32),
        "dense_bf16": (lambda: dense().bfloat16(), lambda x, w: F.linear(x, w), torch.bfloat16),
        "torch_csr": (lambda: (dense() * half).to_sparse_csr(), lambda x, w: (w @ x.T).T, torch.float32),
        "torch_bsr": (bsr, lambda x, w: (w @ x.T).T, torch.float32),
        "torch_int4pack": (int4pack, lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w[0], 128, w[1]), torch.bfloat16),
        "torch_dynamic_int8": (dynamic_int8, lambda x, w: w(x), torch.float32),
        "nm_2:4": (nm24, cpu.packed_matmul, torch.bfloat16),
        "bitmap_50%": (lambda: bitmap.pack((dense() * half).bfloat16().float(), half), cpu.packed_matmul, torch.bfloat16),
        "int4_g128": (lambda: gq.pack(codes(4), *stats(4), 4, 128), cpu.packed_matmul, torch.bfloat16),
        "int8_g128": (lambda: gq.pack(codes(8), *stats(8), 8, 128), cpu.packed_matmul, torch.bfloat16),
        "int3_g128": (lambda: gq.pack(codes(3), *stats(3), 3, 128), cpu.packed_matmul, torch.bfloat16),
        "sq_2:4+int4_g128": (sq24, cpu.packed_matmul, torch.bfloat16),
        "spqr_3b_g16_qq3": (spqr3, cpu.packed_matmul, torch.bfloat16),
        "lut_3b": (lut3, cpu.packed_matmul, torch.bfloat16),
    }


def operand_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.sparse_csr:
            return sum(operand_bytes(t) for t in (obj.crow_indices(), obj.col_indices(), obj.values()))
        if obj.layout == torch.sparse_bsr:
            return sum(operand_bytes(t) for t in (obj.crow_indices(), obj.col_indices(), obj.values()))
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj):
        return sum(operand_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj) if isinstance(getattr(obj, f.name), torch.Tensor))
    if isinstance(obj, tuple):
        return sum(operand_bytes(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        return obj[0].weight().numel()  # int8 codes, one byte each (plus a scale)
    return 0


def run(shapes, batches, min_seconds: float, as_json: bool) -> list[dict]:
    llc, where = llc_bytes()
    threads = torch.get_num_threads()
    say = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    say(f"threads {threads}; last-level cache {where}; kernels: {build.cpu_features()}")
    say("times: median (and best) over passes of the mean per call; ratios from the medians")
    gen = torch.Generator().manual_seed(0)
    records = []
    for out, inp in shapes:
        makers = weights(out, inp, gen)
        times: dict[tuple[str, int], float] = {}
        for name, (make, call, dtype) in makers.items():
            try:
                first = make()
                copies = max(1, math.ceil(2 * llc / max(operand_bytes(first), 1)))
                operands = [first] + [_clone(first) for _ in range(copies - 1)]
            except Exception as error:  # a peer this torch build lacks
                say(f"{name}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
                continue
            nbytes = operand_bytes(first)
            for batch in batches:
                x = torch.randn(batch, inp, generator=gen).to(dtype)
                try:
                    seconds, best = measure(lambda w, x=x, call=call: call(x, w), operands, min_seconds)
                except Exception as error:
                    say(f"{name} batch {batch}: failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
                    continue
                times[(name, batch)] = seconds
                peer = PEERS.get(name)
                record = {"format": name, "shape": [out, inp], "batch": batch, "seconds": seconds, "seconds_best": best,
                          "ratio_vs_dense_fp32": times.get(("dense_fp32", batch), math.nan) / seconds,
                          "ratio_vs_peer": times[(peer, batch)] / seconds if (peer, batch) in times else None, "peer": peer,
                          "weight_bytes": nbytes, "copies": len(operands), "activations": str(dtype).removeprefix("torch.")}
                records.append(record)
                if as_json:
                    print(json.dumps(record), flush=True)
                else:
                    vs_peer = f"{record['ratio_vs_peer']:6.2f}x vs {peer}" if record["ratio_vs_peer"] is not None else ""
                    print(f"{out:>5}x{inp:<5} b{batch:<2} {name:18s} {seconds * 1e3:8.3f} ms (best {best * 1e3:7.3f}) "
                          f"{nbytes / 2**20:6.1f} MiB x{len(operands):<2} "
                          f"{record['ratio_vs_dense_fp32']:6.2f}x vs dense fp32 {vs_peer}", flush=True)
            del operands, first
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4096x4096, batch 1 only")
    parser.add_argument("--json", action="store_true", help="one JSON record per (format, shape, batch) on stdout")
    parser.add_argument("--min-seconds", type=float, default=None, help="time spent per measurement (default 0.3, --quick 0.15)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not build.kernels_available():
        print(f"note: the compiled kernels are unavailable ({build.unavailable_reason()}): ours run the torch reference", file=sys.stderr)
    shapes, batches = (SHAPES[:1], [1]) if args.quick else (SHAPES, [1, 16])
    run(shapes, batches, args.min_seconds or (0.15 if args.quick else 0.3), args.json)


if __name__ == "__main__":
    main()
