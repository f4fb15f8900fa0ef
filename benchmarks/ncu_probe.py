"""Kernels to profile under Nsight Compute: each format's kernel at batch 1 and 16 on 14336x4096, called 3 times,
dense bf16 beside it (results: benchmarks/results/ncu-*). `qmoe` is QMoE's ternary decode-matvec on a random
ternary expert (benchmarks/qmoe_kernels.py), on 14336x4096 and 4096x14336.

    ncu --clock-control none --launch-count 30 -k regex:"splitk|nm24|gemv|nvjet|gemm" --section SpeedOfLight ... \
        python3 benchmarks/ncu_probe.py int4_g128,nm_2:4_bf16
"""
import sys

import gpu_kernels as gk
import torch

fmts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["int4_g128", "nm_2:4_bf16"]
batches = [int(b) for b in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 16]
rows, cols = 14336, 4096
dense = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
for batch in batches:
    x = torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.nn.functional.linear(x, dense)
    for fmt in fmts:
        if fmt == "qmoe":
            import qmoe_kernels as qk

            from compress.kernels import triton_ternary

            for shape in ((rows, cols), (cols, rows)):
                packed = qk.on_device(qk.ternary_expert(*shape, seed=sum(shape)), "cuda")
                xs = torch.randn(batch, shape[1], device="cuda", dtype=torch.bfloat16)
                for _ in range(3):
                    triton_ternary.ternary_dict_matmul(xs, packed)
            torch.cuda.synchronize()
            print(fmt, batch, "ok", flush=True)
            continue
        packed = gk.make(fmt, rows, cols, "cuda")
        op = gk.op_for(packed)
        for _ in range(3):
            op(x, packed)
        torch.cuda.synchronize()
        print(fmt, batch, "ok", flush=True)
