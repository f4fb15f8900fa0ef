"""What sending one compressed target to the other processes costs (compress/calibration/target_split.py): two
processes on gloo (CPU), process 0 sends a target of LLaMA-7B's largest shape ([11008, 4096], as the MLP's
gate/up are) the way `TargetSplit.share` does: the weights in place (dist.broadcast of their bytes), then
the state's entry (mask bits, a GPTQ 4-bit packed form: uint8 codes, float16 scales and zero points per group
of 128) as `broadcast_value` sends it. Prints the seconds of each part, the median of --repeat runs.

    python benchmarks/target_split_broadcast.py [--rows 11008 --columns 4096 --dtype bfloat16 --repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress.calibration.target_split import broadcast_into, broadcast_value
from compress.formats.bits import pack_bits
from compress.formats.quantized import QuantizedWeight


def _entry(rows: int, columns: int, group: int) -> tuple:
    generator = torch.Generator().manual_seed(0)
    groups = -(-columns // group)
    quantized = QuantizedWeight(shape=(rows, columns), bits=4, group_size=group,
                                codes=torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=generator),
                                scale=torch.rand(rows, groups, generator=generator).half(), zero=torch.full((rows, groups), 8.0).half())
    mask = pack_bits(torch.rand(rows, columns, generator=generator) > 0.5, 1)
    return ("target", mask, (rows, columns), quantized, ["gptq"], True, 0.01, 1.0, None)


def _worker(rank: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dtype = getattr(torch, args.dtype)
    weight = torch.randn(args.rows, args.columns).to(dtype) if rank == 0 else torch.empty(args.rows, args.columns, dtype=dtype)
    entry = _entry(args.rows, args.columns, args.group_size) if rank == 0 else None
    times: dict[str, list[float]] = {"weight": [], "entry": []}
    for _ in range(args.repeat):
        dist.barrier()
        start = time.perf_counter()
        broadcast_into(weight, 0)
        middle = time.perf_counter()
        received = broadcast_value(entry, 0)
        times["weight"].append(middle - start)
        times["entry"].append(time.perf_counter() - middle)
    if rank == 1:
        expected = _entry(args.rows, args.columns, args.group_size)[3]
        assert torch.equal(received[3].codes, expected.codes) and torch.equal(received[3].scale, expected.scale)
        result = {part: round(statistics.median(seconds), 3) for part, seconds in times.items()}
        result["bytes"] = {"weight": weight.numel() * weight.element_size(),
                           "entry": sum(t.numel() * t.element_size() for t in (received[1], expected.codes, expected.scale, expected.zero))}
        with open(out, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=11008)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/result.json"
        mp.start_processes(_worker, args=(f"{folder}/store", args, out), nprocs=2, join=True, start_method="spawn")
        with open(out) as handle:
            result = json.load(handle)
    seconds = result["weight"] + result["entry"]
    megabytes = (result["bytes"]["weight"] + result["bytes"]["entry"]) / 1e6
    print(json.dumps({"shape": [args.rows, args.columns], "dtype": args.dtype, **result, "seconds": round(seconds, 3),
                      "MB_per_second": round(megabytes / seconds), "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
