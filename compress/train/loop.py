"""The training loop every training stage shares (nanoGPT-sized): packed sequences, the teacher, the
weighted objective, gradient accumulation, clipping, the schedule, a progress bar with the loss and
tokens/s, the curve, and resumable checkpoints. What a method changes goes through its task's hooks
(compress/methods/training.py).

On CUDA the model trains in fp32 (the stage loads it so: the master weights) under bf16 autocast; on
the CPU in fp32. A run killed after a checkpoint and started again continues from it and, on the CPU,
reaches bit for bit the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.methods.training import TrainingParams, TrainingTask
from compress.progress import bar
from compress.train.checkpoint import load_checkpoint, save_checkpoint
from compress.train.data import PackedSequences
from compress.train.losses import LOSSES, Outputs, objective, weights
from compress.train.schedule import learning_rate

log = logging.getLogger("compress")


@dataclass
class TrainingResult:
    steps: int
    tokens: int  # trained on (the student's), over the whole run, resumed or not
    seconds: float  # of this process's part of the run
    tokens_per_second: float
    final_loss: float
    resumed_at_step: int
    epochs: float
    curve: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What the stage reports (the curve goes to its own file and to the tracking)."""
        return {k: v for k, v in self.__dict__.items() if k != "curve"}


def train(
    model: nn.Module,
    task: TrainingTask,
    params: TrainingParams,
    *,
    data: PackedSequences,
    teacher: Callable[[], nn.Module | None],
    work_dir: Path | None = None,
    stop_after: int | None = None,
) -> TrainingResult:
    """Train `model` in place for `params.steps` optimizer steps. `teacher()` builds the frozen
    teacher (called only when a loss term needs one); `work_dir` holds the checkpoints (none: no
    checkpoints); `stop_after`: return after that many steps (tests of resuming)."""
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    parameters = task.parameters(model)
    optimizer = task.optimizer(parameters, params)
    terms = weights(params)
    needs_teacher = any(LOSSES[name][1] for name in terms)
    needs_hidden = "feature" in terms
    start, curve = 0, []
    saved = load_checkpoint(work_dir)
    if saved is not None:
        unexpected = model.load_state_dict(saved["model"], strict=False).unexpected_keys
        if unexpected:
            raise CompressError(f"the checkpoint in {work_dir} does not fit this model ({unexpected[0]}): delete it to start over")
        optimizer.load_state_dict(saved["optimizer"])
        task.load_state_dict(saved["task"])
        start, curve = saved["step"], saved["curve"]
        log.info("training: resumed at step %d of %d", start, params.steps)
    teacher_model = teacher() if needs_teacher else None
    if teacher_model is not None:
        teacher_model.to(device).eval().requires_grad_(False)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    model.train()
    per_step = params.batch_size * params.grad_accum * params.seqlen
    progress = bar(total=params.steps, desc="training", unit="step", initial=start)
    started, last_loss, done = time.perf_counter(), float("nan"), 0
    window = {"time": started, "steps": 0, "sums": {}}
    try:
        for step in range(start, params.steps):
            rate = learning_rate(step, params)
            for group in optimizer.param_groups:
                group["lr"] = rate
            task.before_step(step, params.steps)
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for micro in range(params.grad_accum):
                ids = data.batch(step * params.grad_accum + micro, params.batch_size).to(device)
                with autocast:
                    student = _outputs(model, ids, needs_hidden)
                    with torch.no_grad():
                        reference = _outputs(teacher_model, ids, needs_hidden) if teacher_model is not None else None
                    loss, parts = objective(student, reference, ids, params)
                (loss / params.grad_accum).backward()
                parts["loss"] = float(loss.detach())
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0.0) + value / params.grad_accum
            task.after_backward()
            if params.clip_grad:
                torch.nn.utils.clip_grad_norm_(parameters, params.clip_grad)
            optimizer.step()
            task.after_step(step, params.steps)
            done += 1
            last_loss = sums["loss"]
            window["steps"] += 1
            for name, value in sums.items():
                window["sums"][name] = window["sums"].get(name, 0.0) + value
            progress.update(1)
            finished = step + 1
            if finished % params.log_every == 0 or finished == params.steps:
                now = time.perf_counter()
                point = {"step": finished, **{k: v / window["steps"] for k, v in window["sums"].items()}, "lr": rate,
                         "tokens_per_second": window["steps"] * per_step / max(now - window["time"], 1e-9), **task.metrics(),
                         "time": time.time()}
                curve.append(point)
                progress.set_postfix_str(f"loss {point['loss']:.3f}, {point['tokens_per_second']:,.0f} tok/s")
                window = {"time": now, "steps": 0, "sums": {}}
            if work_dir is not None and params.checkpoint_every and finished % params.checkpoint_every == 0 and finished < params.steps:
                save_checkpoint(work_dir, {"step": finished, "model": _changing_state(model, parameters), "optimizer": optimizer.state_dict(),
                                           "task": task.state_dict(), "curve": curve})
            if stop_after is not None and done >= stop_after:
                break
    finally:
        progress.close()
        model.eval()
        if use_cache is not None:
            model.config.use_cache = use_cache
    seconds = time.perf_counter() - started
    steps_done = start + done
    return TrainingResult(
        steps=steps_done, tokens=steps_done * per_step, seconds=seconds, tokens_per_second=done * per_step / max(seconds, 1e-9),
        final_loss=last_loss, resumed_at_step=start, epochs=data.epochs(steps_done * params.grad_accum, params.batch_size), curve=curve,
    )


def _outputs(model: nn.Module, ids: torch.Tensor, hidden: bool) -> Outputs:
    out = model(input_ids=ids, output_hidden_states=hidden, use_cache=False)
    return Outputs(out.logits, tuple(out.hidden_states[1:]) if hidden else None)


def _changing_state(model: nn.Module, parameters: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """What of the model a checkpoint must hold: the trained parameters and the buffers. A frozen base
    (adapter training) is loaded again from the stage's input, so it is not written every checkpoint."""
    trained = {id(p) for p in parameters}
    names = {name for name, p in model.named_parameters() if id(p) in trained} | {name for name, _ in model.named_buffers()}
    return {name: value for name, value in model.state_dict().items() if name in names}
