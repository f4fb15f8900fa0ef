"""What the side-by-side peer drivers share (peer_wanda.py, peer_gptq.py).

They run with the project's environment as ``python benchmarks/peer_X.py`` (so this folder is on
sys.path): ours through the pipeline, the peer as a subprocess under the peer virtualenv's python
(benchmarks/peers/llmcompressor_X.py), both on the same calibration tokens, and both checkpoints
scored by our perplexity code.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from compress.calibration.data import calibration_tokens, read_text_file, tokenize
from compress.model.load import LoadedModel, load_model
from compress.pipeline.engine import run
from compress.pipeline.metrics import eval_windows, perplexity
from compress.pipeline.store import StepStore
from compress.recipe import CalibrationSpec, ModelSpec, validate_recipe

PEERS_DIR = Path(__file__).parent / "peers"


def parse_args(doc: str, add_method_args: Callable[[argparse.ArgumentParser], None]) -> argparse.Namespace:
    """The drivers' command line: model, data and peer python, the method's own options, sizes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--peer-python", required=True, help="python of the llm-compressor virtualenv")
    add_method_args(parser)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return args


def prepare(args: argparse.Namespace) -> tuple[CalibrationSpec, LoadedModel, torch.Tensor, torch.Tensor]:
    """(calibration spec, the dense model, its calibration tokens, the evaluation windows)."""
    calibration = CalibrationSpec(text=[args.calibration], nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    loaded = load_model(ModelSpec(source=args.model, device="cpu"))
    tokens, _ = calibration_tokens(calibration, loaded.tokenizer)
    windows = eval_windows(tokenize(loaded.tokenizer, read_text_file(args.eval, "evaluation")), args.seqlen)
    return calibration, loaded, tokens, windows


@contextmanager
def scratch_with_tokens(tokens: torch.Tensor) -> Iterator[tuple[Path, Path]]:
    """A temporary folder holding the calibration tokens the peer reads: (folder, token file)."""
    with tempfile.TemporaryDirectory() as scratch:
        token_file = Path(scratch) / "calibration.pt"
        torch.save(tokens, token_file)
        yield Path(scratch), token_file


def run_ours(args: argparse.Namespace, calibration: CalibrationSpec, stage: dict, name: str, out: Path) -> dict:
    """Our pipeline: one stage on the same calibration, scored on --eval (not the dense model)."""
    recipe = validate_recipe({
        "model": {"source": args.model, "device": "cpu"},
        "calibration": calibration.model_dump(),
        "stages": [stage],
        "evaluate": {"text": args.eval, "seqlen": args.seqlen, "dense": False},
        "output": {"onnx": False},
    }, name=name)
    return run(recipe, out, store=StepStore(out.parent / "steps"))  # a fresh store: nothing cached from other runs


def ours_seconds(ours: dict) -> float:
    """The stage plus the engine's calibration forward passes (the peer's oneshot time has both)."""
    return ours["stages"][0]["seconds"] + ours["calibration"]["forward_seconds"]


def run_peer(args: argparse.Namespace, script: str, token_file: Path, out: Path, extra: list[str]) -> tuple[dict, float]:
    """The peer script under --peer-python; (its peer.json, the whole process's seconds)."""
    start = time.perf_counter()
    subprocess.run([args.peer_python, str(PEERS_DIR / script), "--model", args.model, "--calib-tokens", str(token_file),
                    *extra, "--out", str(out)], check=True)
    process_seconds = time.perf_counter() - start
    return json.loads((out / "peer.json").read_text()), process_seconds


def checkpoint_perplexity(path: Path, windows: torch.Tensor) -> float:
    model = load_model(ModelSpec(source=str(path), device="cpu")).model
    return perplexity(model, windows, torch.device("cpu"))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
