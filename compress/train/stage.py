"""A training stage's loop bound to its recipe: the text (the calibration source, read whole), the
tokenizer, the teacher checkpoint and the stage's work folder; what a training method calls as
`data.train(model, task, params)`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from compress.calibration.data import calibration_text, tokenize
from compress.methods.training import TrainingParams, TrainingTask
from compress.model.load import load_model
from compress.recipe import CalibrationSpec, ModelSpec
from compress.train.data import PackedSequences
from compress.train.loop import TrainingResult, train

CURVE_FILE = "training_curve.json"
WORK_DIR = "train"


def training_sequences(spec: CalibrationSpec, tokenizer_path: Path, seqlen: int, seed: int) -> PackedSequences:
    """The calibration source (text files or a `datasets` id), whole, tokenized and packed."""
    from transformers import AutoTokenizer

    text, source = calibration_text(spec)
    ids = tokenize(AutoTokenizer.from_pretrained(str(tokenizer_path)), text)
    return PackedSequences(ids, seqlen, seed, source)


def bind_trainer(calibration: CalibrationSpec, tokenizer_path: Path, teachers: dict[str, ModelSpec], folder: Path,
                 ) -> Callable[[nn.Module, TrainingTask, TrainingParams], TrainingResult]:
    """`teachers`: the checkpoint each `teacher` choice loads (`original`, `previous`). The loop
    checkpoints into `folder`/train; the curve is written to `folder`/training_curve.json at the end."""

    def run(model: nn.Module, task: TrainingTask, params: TrainingParams) -> TrainingResult:
        data = training_sequences(calibration, tokenizer_path, params.seqlen, params.seed)
        result = train(model, task, params, data=data, teacher=lambda: load_model(teachers[params.teacher]).model, work_dir=folder / WORK_DIR)
        (folder / CURVE_FILE).write_text(json.dumps(result.curve))
        return result

    return run


def read_curve(folder: Path) -> list[dict[str, Any]]:
    path = folder / CURVE_FILE
    return json.loads(path.read_text()) if path.is_file() else []
