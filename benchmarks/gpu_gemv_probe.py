"""One-process probe of decode-size GEMV kernels for group_quant (int4 g128, optionally int2 / int8) on a GPU:
dense bf16 F.linear, torch `_weight_int4pack_mm` (tinygemm), our `packed_matmul` default, and candidate tiles of the
split-K GEMV (compress/kernels/triton_splitk.py, Config kernel 'splitk') and of the older FMA / dot kernels.

    python benchmarks/gpu_gemv_probe.py [--shapes 14336x4096,...] [--batches 1,4,16] [--formats int4_g128] [--json out.jsonl]

Timing as benchmarks/gpu_kernels.py: a CUDA graph calling the op once on each of R weight copies (> 3x the L2),
replayed; the median replay / R, in us. GB/s counts the packed weight (codes, scale, zero) plus x and y. Each
candidate is first checked against the dequantized weight (relative error, recorded)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_kernels import copies_for, int4pack_peer, make, packed_bytes, time_op, unpack
from compress.kernels import triton_config as tc
from compress.kernels import triton_kernels as tk


def candidates(batch: int) -> list:
    """(name, callable(x, packed)) for one batch: split-K GEMV tiles (block_n, warps, stages, split, block_m) and older kernels."""
    out = []
    if batch <= 8:
        bm = min(batch, 4)
        tiles = [(4, 4, 1, 1), (2, 4, 1, 1), (8, 4, 1, 1), (4, 2, 1, 1), (4, 4, 2, 1), (4, 4, 1, 2), (8, 1, 3, 1), (4, 1, 1, 1),
                 (2, 2, 1, 1)] if batch == 1 else [(2, 4, 1, 1), (4, 4, 1, 1), (1, 4, 1, 1), (2, 2, 1, 1), (2, 4, 1, 2), (4, 1, 3, 1)]
        for bn, warps, stages, split in tiles:
            cfg = tk.Config(bm, bn, 0, split, warps, stages, "splitk")
            out.append((f"splitk bn{bn} w{warps} s{stages} split{split} bm{bm}", lambda x, p, c=cfg: tk.packed_matmul(x, p, c)))
    if batch <= 4:  # the older FMA GEMV with plain loads / more warps
        for bn, warps, stages, split in ((4, 4, 1, 1), (8, 2, 2, 1), (4, 4, 2, 2)):
            cfg = tk.Config(batch, bn, 32 * warps * 32, split, warps, stages, "fma")  # block_k: 4 words x 8 codes a lane (int4)
            out.append((f"oldfma {cfg}", lambda x, p, c=cfg: tk.packed_matmul(x, p, c)))
    else:
        for cfg in (tk.Config(16, 64, 256, 2, 4, 3, "dot"), tk.Config(16, 32, 256, 1, 2, 3, "dot"), tk.Config(16, 128, 256, 4, 8, 3, "dot")):
            out.append((f"olddot {cfg}", lambda x, p, c=cfg: tk.packed_matmul(x, p, c)))
    return out


def emit(record: dict, out) -> None:
    print(json.dumps(record), flush=True)
    if out:
        out.write(json.dumps(record) + "\n")
        out.flush()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="14336x4096,4096x14336,4096x4096,11008x4096")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--formats", default="int4_g128")
    parser.add_argument("--json")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    import triton
    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__, "triton": triton.__version__}
    print(json.dumps(env), flush=True)
    out = open(args.json, "w") if args.json else None  # noqa: SIM115 - written record by record
    start = time.time()
    batches = [int(b) for b in args.batches.split(",")]
    for rows, cols in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
        dense = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        p4 = int4pack_peer(w, None)
        p4s = [p4] + [tuple(t.clone() for t in p4) for _ in range(copies_for(p4[0].numel() * p4[0].element_size()) - 1)]
        base = {}
        for batch in batches:
            xs = [torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            base[batch] = {"dense": time_op(F.linear, [(xs[i % 4], d) for i, d in enumerate(dense)], args.reps),
                           "int4pack": time_op(lambda x, p, s: torch._weight_int4pack_mm(x, p, 128, s),
                                               [(xs[i % 4], *p) for i, p in enumerate(p4s)], args.reps)}
            for name, us in base[batch].items():
                emit({"shape": [rows, cols], "batch": batch, "name": name, "us": round(us, 2), **env}, out)
        del dense, p4s
        for fmt in args.formats.split(","):
            packed = make(fmt, rows, cols, "cuda")
            nbytes = packed_bytes(packed)
            copies = [packed] + [type(packed)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(packed).items()})
                                 for _ in range(copies_for(nbytes) - 1)]
            wd = unpack(packed).double()
            for batch in batches:
                xs = [torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
                ref = xs[0].double() @ wd.T
                default = tc.default_config(batch, packed, torch.device("cuda"))
                old_us = None
                for name, fn in [(f"default {default}", tk.packed_matmul)] + candidates(batch):
                    if fmt != "int4_g128" and name.startswith("oldfma"):
                        continue
                    record = {"shape": [rows, cols], "batch": batch, "format": fmt, "name": name}
                    try:
                        err = ((fn(xs[0], packed).double() - ref).norm() / ref.norm()).item()
                        us = time_op(fn, [(xs[i % 4], p) for i, p in enumerate(copies)], args.reps)
                    except Exception as error:  # a candidate that does not compile or run: recorded, skipped
                        emit({**record, "error": f"{type(error).__name__}: {str(error)[:300]}"}, out)
                        continue
                    old_us = us if old_us is None else old_us
                    total = nbytes + 2 * batch * (rows + cols)
                    emit({**record, "us": round(us, 2), "rel_err": float(f"{err:.2e}"), "gbps": round(total / us / 1e3),
                          "x_dense": round(base[batch]["dense"] / us, 3), "x_int4pack": round(base[batch]["int4pack"] / us, 3),
                          "x_old_default": round(old_us / us, 3), "t": round(time.time() - start)}, out)
            del copies, wd
    if out:
        out.close()


if __name__ == "__main__":
    main()
