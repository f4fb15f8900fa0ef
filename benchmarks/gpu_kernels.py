"""GPU kernels (compress/kernels/triton_kernels.py) vs dense bf16 F.linear and the peers torch ships:
`torch._weight_int4pack_mm` (tinygemm, int4 g128) and cuSPARSELt 2:4 (`torch._cslt_sparse_mm`).

    python benchmarks/gpu_kernels.py [--shapes 4096x4096,14336x4096,4096x14336] [--batches 1,4,16,64]
                                     [--sweep] [--json out.jsonl]

Shapes are out x in (W is [out, in], y = x @ W.T), activations bf16. Each timing is one call, measured as
a CUDA graph that calls the op once on each of R copies of the weights (R copies > 3x the L2, so every
call reads its weights from HBM), replayed 20+ times; the median replay / R. GB/s counts the bytes of
the packed weight (codes, scales, zero points, indices) plus x and y. First, every format is checked
against its dequantized weight on every shape (relative error). `--sweep` also times a few other tile
configurations at batch 1 and 16 and reports the best one found beside the default heuristic's.
One JSON record per (format, shape, batch): format, shape, batch, us, gbps, ratio_vs_dense,
ratio_vs_best_peer (best peer: the fastest of dense and the peers at that shape and batch), config.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.formats import group_quant, nm, sparse_quant
from compress.formats.words import tensor_bytes
from compress.kernels import triton_config as tc
from compress.kernels import triton_kernels as tk

FORMATS = ("int4_g128", "int3_g128", "int2_g128", "int8_g128", "nm_2:4_bf16", "2:4+int4_g128")


def make(fmt: str, rows: int, cols: int, device: str):
    """A random packed weight of the format (codes, statistics and masks uniform at random)."""
    g = torch.Generator(device="cpu").manual_seed(rows * 7 + cols)
    if fmt.startswith("int"):
        bits = int(fmt[3])
        groups = -(-cols // 128)
        codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
        scale = (torch.rand(rows, groups, generator=g) * 0.02 + 0.001).half().float()
        zero = torch.randint(0, 2**bits, (rows, groups), generator=g).float()
        packed = group_quant.pack(codes, scale, zero, bits, 128)
    else:
        order = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)
        mask = (order < 2).reshape(rows, cols)
        if fmt.startswith("nm"):
            weight = torch.randn(rows, cols, generator=g).bfloat16().float() * mask
            packed = nm.pack(weight, mask, 2, 4, torch.bfloat16)
        else:
            groups = -(-cols // 128)
            codes = torch.randint(0, 16, (rows, cols), generator=g)
            scale = (torch.rand(rows, groups, generator=g) * 0.02 + 0.001).half().float()
            zero = torch.randint(0, 16, (rows, groups), generator=g).float()
            packed = sparse_quant.pack(mask, codes, scale, zero, 4, 128, "2:4")
    return type(packed)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(packed).items()})


def unpack(packed) -> torch.Tensor:
    return {group_quant.GroupQuantWeight: group_quant.unpack, nm.NMWeight: nm.unpack,
            sparse_quant.SparseQuantWeight: sparse_quant.unpack}[type(packed)](packed)


def packed_bytes(packed) -> int:
    return tensor_bytes({k: v for k, v in vars(packed).items() if isinstance(v, torch.Tensor)})


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
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_op(lambda: b.copy_(a), [()] * 4, reps=10)
    return 2 * a.numel() / us / 1e3


def int4pack_peer(w: torch.Tensor, x_list):
    """torch._weight_int4pack_mm (tinygemm) on an int4 g128 quantization of w; None where unavailable."""
    rows, cols = w.shape
    wf = w.float().reshape(rows, cols // 128, 128)
    lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-6)
    codes = ((wf - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, cols)
    packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(packed_u8, 8)
    # tinygemm: w = (code - 8) * scale + zero with zero = lo + 8 * scale; [groups, out, 2]
    sz = torch.stack([scale.squeeze(-1), (lo + 8 * scale).squeeze(-1)], -1).transpose(0, 1).contiguous().bfloat16()
    return packed, sz


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--sweep", action="store_true", help="also time a few other tiles at batch 1 and 16 on --sweep-shape")
    parser.add_argument("--sweep-shape", default="4096x14336")
    parser.add_argument("--json", help="write one JSON record per (format, shape, batch) to this file")
    args = parser.parse_args(argv)
    import triton

    device = "cuda"
    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "command": " ".join(["python", *sys.argv])}
    bandwidth = copy_bandwidth()
    env["copy_gbps"] = round(bandwidth)
    print(json.dumps(env), flush=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    formats = args.formats.split(",")
    records = []
    out = open(args.json, "w") if args.json else None  # noqa: SIM115 - written record by record, so a cut-off run keeps its part
    for rows, cols in shapes:
        dense_w = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 0.02
        dense_bytes = dense_w.numel() * 2
        dense_copies = [dense_w] + [dense_w.clone() for _ in range(copies_for(dense_bytes) - 1)]
        peers: dict[str, dict[int, float]] = {"dense_bf16": {}, "torch_int4pack_g128": {}, "cusparselt_2:4": {}}
        int4 = None
        try:
            int4 = int4pack_peer(dense_w, None)
        except Exception as error:
            print(f"int4pack unavailable: {error}", flush=True)
        cslt = None
        try:
            mask = (torch.rand(rows, cols // 4, 4, device=device).argsort(-1) < 2).reshape(rows, cols)
            cslt = torch._cslt_compress(dense_w * mask)
        except Exception as error:
            print(f"cuSPARSELt unavailable: {error}", flush=True)
        for batch in batches:
            xs = [torch.randn(batch, cols, device=device, dtype=torch.bfloat16) for _ in range(len(dense_copies))]
            peers["dense_bf16"][batch] = time_op(F.linear, list(zip(xs, dense_copies)))
            if int4 is not None:
                n4 = copies_for(int4[0].numel() * int4[0].element_size())
                p4 = [int4] + [(int4[0].clone(), int4[1].clone()) for _ in range(n4 - 1)]
                try:
                    peers["torch_int4pack_g128"][batch] = time_op(lambda x, p, s: torch._weight_int4pack_mm(x, p, 128, s),
                                                                  [(xs[i % len(xs)], p, s) for i, (p, s) in enumerate(p4)])
                except Exception as error:
                    print(f"int4pack failed: {error}", flush=True)
            if cslt is not None:
                nc = copies_for(cslt.numel() * cslt.element_size())
                pc = [cslt] + [cslt.clone() for _ in range(nc - 1)]
                xt = [torch.randn(cols, max(batch, 16), device=device, dtype=torch.bfloat16) for _ in range(2)]
                try:
                    peers["cusparselt_2:4"][batch] = time_op(lambda c, x: torch._cslt_sparse_mm(c, x), [(c, xt[i % 2]) for i, c in enumerate(pc)])
                except Exception as error:
                    print(f"cuSPARSELt failed: {error}", flush=True)
            for name, times in peers.items():
                if batch in times:
                    us = times[batch]
                    nbytes = {"dense_bf16": dense_bytes, "torch_int4pack_g128": rows * cols // 2 + rows * cols // 128 * 4,
                              "cusparselt_2:4": dense_bytes * 9 // 16}[name] + 2 * batch * (rows + cols)
                    record = {"format": name, "peer": True, "shape": [rows, cols], "batch": batch, "us": round(us, 2),
                              "gbps": round(nbytes / us / 1e3), "ratio_vs_dense": round(peers["dense_bf16"][batch] / us, 3)}
                    records.append(record)
                    print(json.dumps(record), flush=True)
                    if out:
                        out.write(json.dumps({**record, **env}) + "\n")
        for fmt in formats:
            packed = make(fmt, rows, cols, device)
            # correctness on the real shape: against the dequantized weight, bf16 and fp32 activations
            w = unpack(packed)
            for batch in (1, 16):
                x = torch.randn(batch, cols, device=device, dtype=torch.bfloat16)
                ref = x.double() @ w.double().T
                err = ((tk.packed_matmul(x, packed).double() - ref).norm() / ref.norm()).item()
                err32 = ((tk.packed_matmul(x.float(), packed).double() - ref).norm() / ref.norm()).item()
                status = "ok" if err < 1e-2 and err32 < 1e-4 else "FAILED"
                print(f"check {fmt} {rows}x{cols} batch {batch}: rel err bf16 {err:.1e} fp32 {err32:.1e} {status}", flush=True)
            del w
            nbytes = packed_bytes(packed)
            copies = [packed] + [type(packed)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(packed).items()})
                                 for _ in range(copies_for(nbytes) - 1)]
            for batch in batches:
                xs = [torch.randn(batch, cols, device=device, dtype=torch.bfloat16) for _ in range(4)]
                arg_list = [(xs[i % 4], p) for i, p in enumerate(copies)]
                us = time_op(tk.packed_matmul, arg_list)
                best_us, best_cfg = us, "default"
                default = tc.default_config_for(batch, packed, torch.device(device))
                sweep = args.sweep and batch in (1, 16) and f"{rows}x{cols}" == args.sweep_shape
                if sweep:
                    for cfg in candidate_configs(fmt, batch, rows, cols, default):
                        try:
                            t = time_op(lambda x, p, c=cfg: tk.packed_matmul(x, p, c), arg_list, reps=10)
                        except Exception as error:
                            print(f"  {cfg}: {type(error).__name__}", flush=True)
                            continue
                        if t < best_us:
                            best_us, best_cfg = t, cfg
                dense = peers["dense_bf16"][batch]
                best_peer = min(t[batch] for t in peers.values() if batch in t)
                total = nbytes + 2 * batch * (rows + cols)
                record = {"format": fmt, "shape": [rows, cols], "batch": batch, "us": round(us, 2), "gbps": round(total / us / 1e3),
                          "pct_copy_bw": round(100 * total / us / 1e3 / bandwidth, 1), "bytes_per_weight": round(nbytes / (rows * cols), 4),
                          "ratio_vs_dense": round(dense / us, 3), "ratio_vs_best_peer": round(best_peer / us, 3),
                          "config": str(default)}
                if sweep:
                    record.update(best_us=round(best_us, 2), best_ratio_vs_dense=round(dense / best_us, 3), best_config=str(best_cfg))
                records.append(record)
                print(json.dumps(record), flush=True)
                if out:
                    out.write(json.dumps({**record, **env}) + "\n")
                    out.flush()
            del copies
    table(records, env)
    if out:
        out.close()


def candidate_configs(fmt: str, batch: int, rows: int, cols: int, default) -> list:
    """A few tiles around the default (each with the default split rule), and the default unsplit, for --sweep."""
    C = tk.Config
    if batch <= tk.FMA_MAX_BATCH:
        base = [C(1, 32, 256), C(1, 128, 64), C(1, 64, 256, 1, 8)] if fmt.startswith("int") else \
               [C(1, 64, 64), C(1, 16, 256), C(1, 64, 128, 1, 8)]
    else:
        base = [C(16, 64, 128), C(16, 32, 128), C(16, 128, 64, 1, 8)]
    klen = cols if fmt.startswith("int") or batch > tk.FMA_MAX_BATCH else cols // 2
    out = [C(default.block_m, default.block_n, default.block_k, 1, default.num_warps, default.num_stages)]
    for cfg in base:
        split = tc.default_split(batch, rows, cfg.block_m, cfg.block_n, klen, cfg.block_k, torch.device("cuda"))
        out.append(C(cfg.block_m, cfg.block_n, cfg.block_k, split, cfg.num_warps, cfg.num_stages))
    return out


def table(records: list, env: dict) -> None:
    print(f"\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, copy {env['copy_gbps']} GB/s")
    print(f"{'format':22} {'shape':>11} {'batch':>5} {'us':>8} {'GB/s':>6} {'x dense':>8} {'x peer':>7} {'best us':>8}")
    for r in records:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        print(f"{r['format']:22} {shape:>11} {r['batch']:>5} {r['us']:>8.2f} {r['gbps']:>6} {r['ratio_vs_dense']:>8.2f} "
              f"{r.get('ratio_vs_best_peer', float('nan')):>7.2f} {r.get('best_us', float('nan')):>8.2f}")


if __name__ == "__main__":
    main()
