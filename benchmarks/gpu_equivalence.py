"""Do the GPU speed-ups change results? The same recipes on a shipped model, each run by the code as it is now
and by older code (or the current code with its fast paths switched off), compared: perplexity, KL to the dense
model, and the weights themselves (the share of masks that differ, the largest weight difference).

Variants:
  now    the code on the path (fused sweeps, siblings together, block placement)
  loop   the same code with COMPRESS_FUSED_SWEEP=0 and COMPRESS_JOINT_SIBLINGS=0 (the column loop, one target
         at a time); skipped for methods without a sweep
  old    a tree of older code (--old, a folder holding its compress/ package), e.g. from before the fast paths:
         git archive a2a820b~1 compress | tar -x -C /tmp/old

    python benchmarks/gpu_equivalence.py --model ../shared/models/shakespeare-llama-7m \
        --calibration ../shared/corpus/shakespeare-milton/train.txt --eval ../shared/corpus/shakespeare-milton/eval.txt \
        --device cuda --old /tmp/old --json benchmarks/results/gpu-equivalence.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

STAGES = {
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "wanda-2of4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt-2of4": {"method": "sparsegpt", "pattern": "2:4"},
    "gptq-4bit": {"method": "gptq", "bits": 4, "group_size": 128},
    "spqr-3bit": {"method": "spqr", "bits": 3},
}
SWEEPS = ("sparsegpt", "gptq", "spqr")  # methods the loop variant changes


def _run(name: str, stage: dict, args: argparse.Namespace, work: Path, variant: str) -> dict:
    recipe = {
        "name": name,
        "model": {"source": str(Path(args.model).resolve()), "device": args.device},
        "calibration": {"text": [str(Path(args.calibration).resolve())], "nsamples": args.nsamples, "seqlen": args.seqlen},
        "stages": [stage],
        "evaluate": {"text": str(Path(args.eval).resolve()), "seqlen": args.seqlen, "layer_error": False},
        "output": {"hf": True, "verify": False},
    }
    path = work / f"{name}-{variant}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / f"{name}-{variant}"
    env = {**os.environ, "COMPRESS_HOME": str(work / f"home-{variant}")}
    if variant == "loop":
        env.update(COMPRESS_FUSED_SWEEP="0", COMPRESS_JOINT_SIBLINGS="0")
    if variant == "old":
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.old).resolve()), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compress", "run", str(path), "--out", str(out), "--no-track", "--quiet"],
                          env=env, capture_output=True, text=True, cwd=work)
    if done.returncode:
        return {"error": done.stderr[-1500:]}
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    return {"seconds": round(time.perf_counter() - start, 2), "out": str(out),
            **{k: metrics[k] for k in ("perplexity", "kl_to_dense", "dense_perplexity") if k in metrics}}


def _compare(one: Path, other: Path) -> dict:
    """Masks and weights of two runs' dense checkpoints (model/): the share of zero patterns that differ, the largest
    weight difference relative to the tensor's largest weight."""
    from safetensors.torch import load_file

    def tensors(out: Path) -> dict:
        found = {}
        for file in sorted((out / "model").glob("*.safetensors")):
            found.update(load_file(file))
        return found

    a, b = tensors(one), tensors(other)
    differ = numel = 0
    worst = 0.0
    for name, tensor in a.items():
        if tensor.dim() != 2 or name not in b:
            continue
        x, y = tensor.float(), b[name].float()
        differ += int(((x == 0) != (y == 0)).sum())
        numel += x.numel()
        worst = max(worst, float((x - y).abs().max()) / max(float(x.abs().max()), 1e-12))
    return {"mask_differ": differ / max(numel, 1), "max_relative_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--recipes", default=",".join(STAGES))
    parser.add_argument("--old", help="a folder holding an older compress/ package")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for name in args.recipes.split(","):
            stage = STAGES[name]
            variants = ["now"] + (["loop"] if stage["method"] in SWEEPS else []) + (["old"] if args.old else [])
            runs = {variant: _run(name, stage, args, work, variant) for variant in variants}
            record = {"recipe": name, "stage": stage, "device": args.device, **{v: {k: x for k, x in r.items() if k != "out"}
                                                                                for v, r in runs.items()}}
            for variant in variants[1:]:
                if "out" in runs["now"] and "out" in runs[variant]:
                    record[f"now_vs_{variant}"] = _compare(Path(runs["now"]["out"]), Path(runs[variant]["out"]))
            print(json.dumps(record), flush=True)
            records.append(record)
    if args.json:
        header = {"command": " ".join(sys.argv), "model": args.model}
        try:
            import torch

            header.update(torch=torch.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        except ImportError:
            pass
        Path(args.json).write_text(json.dumps({"header": header, "records": records}, indent=1))


if __name__ == "__main__":
    main()
