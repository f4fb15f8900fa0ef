"""Time saved by resuming inside a stage (issue 8.5): a run is SIGKILLed from outside once its stage
has checkpointed half of the blocks, then started again; compared with an uninterrupted run of the
same recipe in a fresh step store, and the outputs compared byte for byte.

    python benchmarks/resume_timing.py recipes/spqr-3bit.yaml --model ../shared/models/shakespeare-llama-7m \\
        --json docs/results/resume-7m-spqr.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _compress(recipe: str, model: str, out: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "COMPRESS_HOME": str(home)}
    command = [sys.executable, "-m", "compress", "run", recipe, "--no-track", "--out", str(out), "--set", f"model.source={model}",
               "--set", "output.onnx=false"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _progress(home: Path) -> int:
    """The next block of the stage being computed (from its checkpoint), 0 if none yet."""
    found = list((home / "steps").glob(".stage-*.resume/resume/progress.json"))
    return max((json.loads(p.read_text())["next_block"] for p in found), default=0) if found else 0


def _files(out: Path) -> dict[str, bytes]:
    names = sorted((out / "model").glob("*.safetensors")) + [out / "compress_state.safetensors", out / "packed.safetensors"]
    return {str(p.relative_to(out)): p.read_bytes() for p in names if p.exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--model", required=True)
    parser.add_argument("--kill-at-block", type=int, help="kill once this many blocks are checkpointed (default: half)")
    parser.add_argument("--json")
    args = parser.parse_args()
    from transformers import AutoConfig

    blocks = AutoConfig.from_pretrained(args.model).num_hidden_layers
    kill_at = args.kill_at_block or blocks // 2
    scratch = Path(tempfile.mkdtemp(prefix="compress-resume-"))

    start = time.perf_counter()
    whole = _compress(args.recipe, args.model, scratch / "whole", scratch / "home-whole")
    if whole.wait() != 0:
        raise SystemExit(whole.stderr.read())
    uninterrupted = time.perf_counter() - start

    start = time.perf_counter()
    victim = _compress(args.recipe, args.model, scratch / "resumed", scratch / "home-resumed")
    while _progress(scratch / "home-resumed") < kill_at:
        if victim.poll() is not None:
            raise SystemExit(f"the run ended before block {kill_at} was checkpointed")
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    until_kill = time.perf_counter() - start
    killed_at = _progress(scratch / "home-resumed")

    start = time.perf_counter()
    resumed = _compress(args.recipe, args.model, scratch / "resumed", scratch / "home-resumed")
    if resumed.wait() != 0:
        raise SystemExit(resumed.stderr.read())
    after_restart = time.perf_counter() - start
    stage_steps = [json.loads(p.read_text()) for p in (scratch / "home-resumed" / "steps").glob("stage-*/step.json")]
    result = {
        "recipe": args.recipe,
        "model": args.model,
        "blocks": blocks,
        "killed_with_blocks_checkpointed": killed_at,
        "resumed_at_block": [s["resumed_at_block"] for s in stage_steps],
        "seconds_uninterrupted": round(uninterrupted, 1),
        "seconds_until_kill": round(until_kill, 1),
        "seconds_after_restart": round(after_restart, 1),
        "seconds_after_restart_without_resume": round(uninterrupted, 1),
        "saved_seconds": round(uninterrupted - after_restart, 1),
        "outputs_identical": _files(scratch / "whole") == _files(scratch / "resumed"),
        "command": "python benchmarks/resume_timing.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
