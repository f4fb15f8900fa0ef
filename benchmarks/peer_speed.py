"""Our layer-wise engine and llm-compressor's oneshot, timed side by side in one run on the same random
LLaMA (LLaMA-7B's shape by default, bf16) and the same calibration tokens: Wanda 50% and SparseGPT 50%
(unstructured), GPTQ W4A16 (int4, symmetric, groups of 128, activation order).

    # GPU: LLaMA-7B shape, 128 x 2048 calibration tokens (llm-compressor from /tmp/llmc, see
    # benchmarks/peers/setup_llmcompressor_gpu.sh)
    python benchmarks/peer_speed.py --device cuda --json bench-out/peer-speed-7b.json
    # CPU, a tiny shape (the CPU peer venv .peers/llmc-venv: benchmarks/peers/setup_llmcompressor.sh)
    python benchmarks/peer_speed.py --layers 2 --hidden 256 --intermediate 768 --heads 4 \\
        --nsamples 8 --seqlen 128 --device cpu

Ours: the engine call of benchmarks/pruning_speed.py (run_layerwise), the model in host memory and
each block moved to the device while it is compressed, reloaded from the dense weights before each
method. Peer: benchmarks/peers/llmcompressor_speed.py under the peer's python, one process per
method, on a model built from the same config with the same seed (``weights_fingerprint`` in the
header and in each peer record shows they match); its docstring gives the modifiers and where
oneshot places things. Each side's ``seconds`` is the compression call alone (run_layerwise,
oneshot) between CUDA synchronizes, model building left out; ``peak_gib`` is
torch.cuda.max_memory_allocated after reset_peak_memory_stats, in the process that ran it. speedup
= peer_seconds / seconds. What each side ran is in each record's ``ours`` and ``peer``.

Without a usable llm-compressor (--peer-python, else .peers/llmc-venv/bin/python, else
/tmp/llmc/bin/python) the peer columns are null and ours runs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from pruning_speed import llama_config, plan, random_llama_7b

from compress.calibration.data import batches
from compress.calibration.layerwise import run_layerwise
from compress.model.targets import discover
from compress.state import CompressionState

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "llmcompressor_speed.py"
DEFAULT_PEER_PYTHONS = (ROOT / ".peers" / "llmc-venv" / "bin" / "python", Path("/tmp/llmc/bin/python"))
NOT_INSTALLED = "llm-compressor not installed: peer columns skipped (see benchmarks/peers/README.md)"

METHODS = ("wanda", "sparsegpt", "gptq")
# our chain for each method, in pruning_speed.plan's syntax (a pruning method without parameters
# prunes 50% unstructured). GPTQ as close to W4A16 as our parameters go: int4, symmetric, groups of
# 128, columns by decreasing Hessian diagonal; blocks of 128 and damping 0.01 are both sides' defaults.
OURS = {
    "wanda": "wanda",
    "sparsegpt": "sparsegpt",
    "gptq": "gptq:bits=4,group_size=128,symmetric=true,act_order=true",
}
PEER_PROBE = (
    "import json, torch, transformers, llmcompressor, compressed_tensors; print(json.dumps({"
    "'llmcompressor': llmcompressor.__version__, 'compressed-tensors': compressed_tensors.__version__, "
    "'torch': torch.__version__, 'transformers': transformers.__version__, 'cuda': torch.cuda.is_available()}))"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the random model")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size, ours and the peer's")
    parser.add_argument("--peer-batch-size", type=int, help="the peer's alone (default: --batch-size; oneshot's own default is 1)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--ours-gptq", default=OURS["gptq"],
                        help="our GPTQ chain (e.g. static_groups=true without act_order: the peer's grids, not its column order)")
    parser.add_argument("--peer-python", help="python of an environment where llmcompressor imports "
                                              "(default: .peers/llmc-venv/bin/python, then /tmp/llmc/bin/python)")
    parser.add_argument("--no-peer", action="store_true", help="run ours alone")
    parser.add_argument("--no-warmup", action="store_true",
                        help="time cold: without first running each method once, untimed, on one block (ours) or a "
                             "one-layer model (the peer) and one batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (both sides) and of the tokens")
    parser.add_argument("--json", help="write {header, records} here; the peer's logs go beside it")
    args = parser.parse_args()
    OURS["gptq"] = args.ours_gptq
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: {', '.join(unknown) or 'none given'}; choose from {', '.join(METHODS)}")
    return args


def peer_env(device: torch.device) -> dict[str, str]:
    """The peer's environment: ours without the repository root on PYTHONPATH (it has folders named
    like packages, e.g. mlflow/); no GPU visible when we run on the CPU (oneshot takes a GPU when it
    sees one)."""
    env = dict(os.environ)
    paths = [path for path in env.pop("PYTHONPATH", "").split(os.pathsep) if path and Path(path).resolve() != ROOT]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def probe_peer(python: str, device: torch.device) -> tuple[dict | None, str]:
    """(llm-compressor's versions there, or None and why not)."""
    if not Path(python).exists():
        return None, "not found"
    try:
        done = subprocess.run([python, "-c", PEER_PROBE], capture_output=True, text=True, timeout=600, env=peer_env(device))
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, str(error)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return None, lines[-1] if lines else f"exit code {done.returncode}"
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    if device.type == "cuda" and not versions["cuda"]:
        return None, f"its torch {versions['torch']} sees no GPU"
    del versions["cuda"]
    return versions, ""


def find_peer(args: argparse.Namespace, device: torch.device) -> tuple[str | None, dict | None]:
    """(the peer's python, its versions), or (None, None) after the notice."""
    if args.no_peer:
        print("--no-peer: peer columns skipped", flush=True)
        return None, None
    if args.peer_python:
        versions, why = probe_peer(args.peer_python, device)
        if versions is None:
            raise SystemExit(f"--peer-python {args.peer_python}: cannot run llm-compressor ({why})")
        return args.peer_python, versions
    unusable = []
    for candidate in DEFAULT_PEER_PYTHONS:
        versions, why = probe_peer(str(candidate), device)
        if versions is not None:
            return str(candidate), versions
        if why != "not found":
            unusable.append(f"{candidate}: {why}")
    print(NOT_INSTALLED, flush=True)
    for line in unusable:
        print(f"  ({line})", flush=True)
    return None, None


def weights_fingerprint(model: torch.nn.Module) -> list[float]:
    """Sums of a few weights; llmcompressor_speed.py computes the same on the peer's model."""
    layers = model.model.layers
    tensors = [model.model.embed_tokens.weight, layers[0].self_attn.q_proj.weight, layers[-1].mlp.down_proj.weight, model.lm_head.weight]
    return [round(float(t.detach().double().sum()), 6) for t in tensors]


def warm_up(model, dense, layout, method: str, tokens: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """The method once on the first block and one batch, untimed (the GPU kernels' first-use
    compilation and the libraries' first calls are then paid); seconds it took."""
    stages = plan(OURS[method], "unstructured", layout)
    for stage in stages:
        stage.targets = [target for target in stage.targets if target.block == 0]
    start = time.perf_counter()
    run_layerwise(model, layout, stages, CompressionState(), batches(tokens[:batch_size], batch_size), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.load_state_dict(dense)
    return seconds


def run_ours(model, dense, layout, method: str, tokens: torch.Tensor, batch_size: int, device: torch.device, warmup: bool) -> dict:
    """pruning_speed's engine call for one method, from the dense weights."""
    model.load_state_dict(dense)
    warmup_seconds = warm_up(model, dense, layout, method, tokens, batch_size, device) if warmup else None
    stages = plan(OURS[method], "unstructured", layout)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    begin = time.perf_counter()
    outcome = run_layerwise(model, layout, stages, CompressionState(), batches(tokens, batch_size), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    stage = outcome.stages[0]
    if stage.changed != len(stages[0].targets):
        raise SystemExit(f"ours, {method}: {stage.changed} of {len(stages[0].targets)} targets changed")
    return {
        "seconds": round(seconds, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "chain": OURS[method],
        "params": stages[0].method.params.model_dump(mode="json"),
        "stage_seconds": round(stage.seconds, 2),
        "forward_seconds": round(outcome.forward_seconds, 2),
        "warmup_seconds": None if warmup_seconds is None else round(warmup_seconds, 2),
        "targets": len(stages[0].targets),
        "sparsity": round(stage.sparsity, 4) if method != "gptq" else None,
        "batch_size": batch_size,
        "placement": {"model_home": "cpu", "blocks": outcome.placement, "device": str(device),
                      "activations": f"on {device} (the batches' hidden states stay there between blocks)"},
    }


def run_peer(python: str, method: str, scratch: Path, args: argparse.Namespace, batch_size: int, device: torch.device, log: Path) -> dict:
    """llmcompressor_speed.py for one method, in its own process; its record, or {"error": ...}."""
    out = scratch / f"peer-{method}.json"
    command = [python, str(PEER_SCRIPT), "--method", method, "--config", str(scratch / "config.json"),
               "--calib-tokens", str(scratch / "tokens.pt"), "--batch-size", str(batch_size), "--seed", str(args.seed),
               "--device", device.type, "--json", str(out), *([] if args.no_warmup else ["--warmup"])]
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=peer_env(device))
    process_seconds = time.perf_counter() - start
    if done.returncode or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-25:]
        print(f"peer {method} FAILED (exit code {done.returncode}), the end of its log {log}:", *tail, sep="\n", file=sys.stderr, flush=True)
        return {"error": f"exit code {done.returncode}", "log_tail": tail}
    record = json.loads(out.read_text())
    record["process_seconds"] = round(process_seconds, 2)
    return record


def main() -> None:
    args = parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    peer_python, peer_versions = find_peer(args, device)
    if peer_python and "gptq" in args.methods and (args.hidden % 128 or args.intermediate % 128):
        raise SystemExit("gptq: llm-compressor's W4A16 needs --hidden and --intermediate divisible by its groups of 128 "
                         "(e.g. --hidden 256 --intermediate 768)")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peer_batch_size = args.peer_batch_size or args.batch_size

    config = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    start = time.perf_counter()
    model = random_llama_7b(device, config, seed=args.seed)
    load_seconds = time.perf_counter() - start
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layout = discover(model)
    tokens = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(args.seed))
    fingerprint = weights_fingerprint(model)

    header = {
        "command": shlex.join(sys.orig_argv),
        "device": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llmcompressor": peer_versions and peer_versions["llmcompressor"],
        "compressed-tensors": peer_versions and peer_versions["compressed-tensors"],
        "peer_python": peer_python,
        "peer_versions": peer_versions,  # the peer's own torch / transformers (the same on a machine sharing them)
        "model": {"shape": "LLaMA", "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                  "vocab": args.vocab, "dtype": "bfloat16", "params": sum(p.numel() for p in model.parameters()), "seed": args.seed},
        "weights_fingerprint": fingerprint,
        "calibration_tokens": f"{args.nsamples} x {args.seqlen}",
        "batch_size": args.batch_size,
        "peer_batch_size": peer_batch_size if peer_python else None,
        "load_seconds": round(load_seconds, 2),
        "warmup": not args.no_warmup,
    }
    print(json.dumps(header), flush=True)

    records, failed = [], []
    log_dir = Path(args.json).parent if args.json else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        config.to_json_file(scratch / "config.json")
        torch.save(tokens, scratch / "tokens.pt")
        for method in args.methods:
            ours = run_ours(model, dense, layout, method, tokens, args.batch_size, device, warmup=not args.no_warmup)
            print(f"ours {method}", json.dumps({k: ours[k] for k in ("seconds", "stage_seconds", "forward_seconds", "peak_gib")}), flush=True)
            peer = None
            if peer_python:
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the GPU to the peer's process, but for our CUDA context
                log = (log_dir / f"{Path(args.json).stem}.peer-{method}.log") if log_dir else scratch / f"peer-{method}.log"
                peer = run_peer(peer_python, method, scratch, args, peer_batch_size, device, log)
                if "error" in peer:
                    failed.append(method)
                else:
                    if peer["weights_fingerprint"] != fingerprint:
                        why = " (another torch draws other numbers)" if peer["versions"]["torch"] != torch.__version__ else ""
                        print(f"note: the peer's {method} model has other weights than ours{why}: the time does not depend on them "
                              f"({peer['weights_fingerprint']} vs {fingerprint})", file=sys.stderr, flush=True)
                    print(f"peer {method}", json.dumps({k: peer[k] for k in ("seconds", "load_seconds", "peak_gib")}), flush=True)
            peer_seconds = peer.get("seconds") if peer else None
            records.append({
                "method": method,
                "layers": args.layers,
                "seconds": ours["seconds"],
                "peer_seconds": peer_seconds,
                "peak_gib": ours["peak_gib"],
                "peer_peak_gib": peer.get("peak_gib") if peer else None,
                "speedup": round(peer_seconds / ours["seconds"], 2) if peer_seconds and ours["seconds"] else None,
                "gpu": gpu,
                "ours": ours,
                "peer": peer,
            })

    def cell(value, unit=""):
        return "—" if value is None else f"{value}{unit}"

    print("\n| method | ours s | llm-compressor s | speedup (peer/ours) | ours peak GiB | llm-compressor peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['method']} | {r['seconds']} | {cell(r['peer_seconds'])} | {cell(r['speedup'], 'x')} | "
              f"{cell(r['peak_gib'])} | {cell(r['peer_peak_gib'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "records": records}, indent=2))
        print(f"written {args.json}")
    if failed:
        raise SystemExit(f"the peer failed for: {', '.join(failed)} (its records hold the end of its log)")


if __name__ == "__main__":
    main()
