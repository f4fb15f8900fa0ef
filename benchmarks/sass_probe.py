"""Instruction counts of a Triton kernel compiled offline for a GPU this machine need not have (sm_90 by default):
the whole kernel and its main loop (the largest span between a label and a backward branch to it), by opcode.
Nothing runs; Triton's own ptxas and nvdisasm compile and disassemble.

    # the int4 g128 split-K GEMV step: 4 rows, 64 lanes, 4 words a lane, 2 warps, batch 1
    python benchmarks/sass_probe.py compress.kernels.triton_splitk _gq_splitk_kernel \\
        --signature '{"x_ptr": "*bf16", "out_ptr": "*fp32", "codes_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*i32",
                      "M": "i32", "N": "i32", "K": "i32", "WPR": "i32", "GROUPS": "i32", "ZWPR": "i32", "k_iters": "i32",
                      "FMASK": "i32", "MAGIC": "i32"}' \\
        --constexprs '{"BITS": 4, "PER": 8, "CH": 8, "GROUP": 128, "ZERO_INT": true, "ATOMIC": true, "I64": false,
                       "MASKED": false, "BLOCK_M": 1, "BLOCK_N": 4, "L": 64, "V": 4, "STAGES": 1, "INTERPRET": false, "LUT": false}' \\
        --warps 2
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import tempfile

OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_of(kernel) -> str:
    import triton

    if kernel.asm.get("sass"):
        return kernel.asm["sass"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(kernel.asm["cubin"])
    disassembler = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    try:
        return subprocess.run([disassembler, "-c", handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)


def opcodes(lines: list[str]) -> collections.Counter:
    found: collections.Counter = collections.Counter()
    for line in lines:
        match = OPCODE.search(line)
        if match:
            found[match.group(1).split(".")[0]] += 1
    return found


def main_loop(lines: list[str]) -> list[str]:
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\.(L_x_\d+):", line.strip()))}
    best = (0, -1)
    for i, line in enumerate(lines):
        match = re.search(r"BRA[^`]*`\(\.(L_x_\d+)\)", line)
        if match and labels.get(match.group(1), i) < i and i - labels[match.group(1)] > best[1] - best[0]:
            best = (labels[match.group(1)], i)
    return lines[best[0] : best[1] + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module")
    parser.add_argument("kernel")
    parser.add_argument("--signature", required=True, help="JSON: argument name -> Triton type, for the run-time arguments")
    parser.add_argument("--constexprs", default="{}", help="JSON: argument name -> value")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--sass", help="write the disassembly here")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    function = getattr(importlib.import_module(args.module), args.kernel)
    constexprs = json.loads(args.constexprs)
    signature = {**json.loads(args.signature), **dict.fromkeys(constexprs, "constexpr")}
    names = list(function.arg_names)
    source = ASTSource(function, {n: signature[n] for n in names}, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": args.warps, "num_stages": args.stages})
    lines = sass_of(kernel).splitlines()
    if args.sass:
        with open(args.sass, "w") as handle:
            handle.write("\n".join(lines))
    for label, part in (("kernel", lines), ("main loop", main_loop(lines))):
        counts = opcodes(part)
        print(f"{label}: {sum(counts.values())} instructions;", ", ".join(f"{op} {n}" for op, n in counts.most_common(14)))


if __name__ == "__main__":
    main()
