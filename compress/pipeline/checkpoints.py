"""The checkpoint a step leaves (a Hugging Face model folder plus the compression state beside it),
opened for the next step."""

from __future__ import annotations

from compress.model.load import LoadedModel, load_model, pick_device
from compress.pipeline.store import StepResult
from compress.recipe import ModelSpec
from compress.state import STATE_FILE, CompressionState


def compute_settings(spec: ModelSpec) -> dict[str, str]:
    """What, besides the inputs, decides a step's numbers: the resolved device type and dtype."""
    return {"device": pick_device(spec.device).type, "dtype": spec.dtype}


def checkpoint_spec(step: StepResult, spec: ModelSpec) -> ModelSpec:
    """The recipe's model section pointed at the checkpoint a step left (the source model for load)."""
    return spec.model_copy(update={"source": str(step.model_path), "kind": step.info.get("kind", spec.kind)})


def checkpoint_state(step: StepResult, read_packed_forms: bool = True) -> CompressionState:
    """The compression state a step left (empty for load); see CompressionState.load."""
    return CompressionState.load(step.path, read_packed_forms) if (step.path / STATE_FILE).is_file() else CompressionState()


def open_checkpoint(step: StepResult, spec: ModelSpec) -> tuple[LoadedModel, CompressionState]:
    """The model, loaded whole, and compression state a step left."""
    return load_model(checkpoint_spec(step, spec)), checkpoint_state(step)
