"""The recipe schema: what a user writes, validated into typed objects before any work starts.

A recipe has `model`, `calibration`, `stages`, `evaluate` and `output`. Each stage names a registered
method; its other keys are that method's typed parameters. Command-line overrides
(`--set stages.0.sparsity=0.7`) are applied to the raw data and then go through the same validation.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator, model_validator

from compress.errors import CompressError
from compress.methods import get_method


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_StrictModel):
    """Which model to compress. `source` is a local folder or a hub id; none means the embedded default."""

    source: str | None = None
    kind: Literal["auto", "causal", "encoder"] = "auto"
    # compute dtype ("auto": float32 on CPU, the checkpoint's on CUDA); weights are saved in the checkpoint's
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _accept_plain_path(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data


class CalibrationSpec(_StrictModel):
    """Calibration tokens: `text` files or a `datasets` id; neither means the embedded training text."""

    text: list[str] | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    dataset_field: str = "text"
    nsamples: PositiveInt = 128
    seqlen: PositiveInt = 256
    seed: int = 0
    batch_size: PositiveInt = 8

    @field_validator("text", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSpec:
        if self.text and self.dataset:
            raise ValueError("give either `text` or `dataset`, not both")
        return self


class EvaluateSpec(_StrictModel):
    """Perplexity on a text file in non-overlapping windows (causal LMs); embedding cosine (encoders)."""

    text: str | None = None
    seqlen: PositiveInt = 256
    batch_size: PositiveInt = 8
    max_windows: PositiveInt | None = None
    dense: bool = True  # also evaluate the uncompressed model, for the ratios in the report
    # causal LMs, with `dense`: KL(dense || compressed) per token over the dense model's top-k next
    # tokens (+ the rest as one bin) and the top-1 agreement; 0: perplexity only
    kl_top_k: NonNegativeInt = 64
    # every target's relative output error on the calibration inputs (||WX - W'X||^2 / ||WX||^2, from
    # X^T X): one X^T X per target, and calibration data even for data-free methods
    layer_error: bool = True


class OutputSpec(_StrictModel):
    dir: str | None = None  # default: runs/<recipe name> (`compress run`), a folder per run (submissions)
    hf: bool = False  # also write model/, the dense HF checkpoint (packed/ is always written)
    onnx: bool = False  # also export model.onnx, checked against PyTorch in onnxruntime
    verify: bool = True  # compare packed/ on the kernels with the evaluated model before publishing
    register_as: str | None = None  # MLflow registered model name (default: the recipe name)
    register_model: bool = True  # add the exported model to the MLflow model registry (tracked runs)


class StageSpec(BaseModel):
    """One validated stage: a registered method and its typed parameters."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: str
    params: Any

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params.model_dump(mode="json")}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    stages: list[StageSpec]
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    def describe(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what the report and tracking record)."""
        return {
            "name": self.name,
            "model": self.model.model_dump(mode="json"),
            "calibration": self.calibration.model_dump(mode="json"),
            "stages": [stage.describe() for stage in self.stages],
            "evaluate": self.evaluate.model_dump(mode="json"),
            "output": self.output.model_dump(mode="json"),
        }

    def to_data(self) -> dict[str, Any]:
        """The recipe in the form a recipe file takes (stages flat), resolved: what a submission sends."""
        data = self.describe()
        data["stages"] = [{"method": stage.method, **stage.params.model_dump(mode="json")} for stage in self.stages]
        return data

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]


class _TopLevel(_StrictModel):
    """The recipe before its stages are resolved against the method registry."""

    name: str | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    stages: list[dict[str, Any]] = Field(min_length=1)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)


# --- YAML -------------------------------------------------------------------------------------


MAX_RECIPE_BYTES, MAX_SET_CHARS, MAX_DEPTH = 1 << 20, 10_000, 32  # a recipe is a few hundred bytes, 4 levels deep


class _RecipeLoader(yaml.SafeLoader):
    """`2:4` stays a string (YAML 1.1 reads base-60 124); no aliases (`<<: [*a, *a]` merges grow exponentially), no deep nesting."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias, self.depth = self.check_event(yaml.AliasEvent), self.depth + 1
        if alias or self.depth > MAX_DEPTH:
            problem = "aliases (*name) are not allowed in a recipe" if alias else f"nested deeper than {MAX_DEPTH} levels"
            raise yaml.MarkedYAMLError(problem=problem, problem_mark=self.peek_event().start_mark)
        node = super().compose_node(parent, index)
        self.depth -= 1
        return node


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except (ValueError, OverflowError) as error:  # from a constructor: `2024-13-01` is no date, `!!int x` no integer
        raise yaml.YAMLError(str(error)) from None


# --- overrides --------------------------------------------------------------------------------


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` override in place; the value is read as YAML (`0.7`, `2:4`, `[a, b]`)."""
    if len(assignment) > MAX_SET_CHARS:
        raise CompressError(f"--set {assignment[:60]!r}...: longer than {MAX_SET_CHARS:,} characters")
    if "=" not in assignment:
        raise CompressError(f"--set {assignment!r}: expected key.path=value, e.g. stages.0.sparsity=0.7")
    path, raw_value = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise CompressError(f"--set {assignment!r}: empty key in {path!r}")
    try:
        value = parse_yaml(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise CompressError(f"--set {assignment!r}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(key, node, where)]
        elif isinstance(node, dict):
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        else:
            raise CompressError(f"--set {assignment!r}: {where} is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(last, node, path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise CompressError(f"--set {assignment!r}: cannot set {path!r}")


def _list_index(key: str, items: list[Any], where: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise CompressError(f"--set: {where!r} needs an index between 0 and {len(items) - 1}")
    return int(key)


# --- validation -------------------------------------------------------------------------------


def _format_validation_error(error: ValidationError, model: type[BaseModel], prefix: str = "", tag: str = "") -> str:
    """One line naming the first problem, with the allowed keys for a misspelled one."""
    first = error.errors()[0]
    location = ".".join([prefix, *(str(part) for part in first["loc"])] if prefix else [str(p) for p in first["loc"]])
    tag = f" ({tag})" if tag else ""
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        allowed = _allowed_keys(model, first["loc"][:-1])
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = location.rsplit(".", 1)[0] if "." in location else "recipe"
        return f"{where}{tag}: unknown key {key!r} (allowed: {', '.join(allowed)}){hint}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{location or 'recipe'}{tag}: {message}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)


def validate_recipe(data: Any, name: str = "recipe") -> Recipe:
    """Validate raw recipe data (from YAML plus overrides) into a typed Recipe, or raise CompressError."""
    if not isinstance(data, dict):
        raise CompressError("recipe: expected a mapping with `stages` (and optionally model, calibration, ...)")
    try:
        top = _TopLevel.model_validate(data)
    except ValidationError as error:
        raise CompressError(_format_validation_error(error, _TopLevel)) from None
    stages = []
    for index, raw in enumerate(top.stages):
        where = f"stages.{index}"
        if not isinstance(raw, dict) or "method" not in raw:
            raise CompressError(f"{where}: each stage needs `method` (e.g. method: wanda)")
        try:
            method = get_method(str(raw["method"]))
        except CompressError as error:
            raise CompressError(f"{where}.method: {error}") from None
        params_data = {key: value for key, value in raw.items() if key != "method"}
        try:
            params = method.Params.model_validate(params_data)
        except ValidationError as error:
            raise CompressError(_format_validation_error(error, method.Params, where, method.name)) from None
        stages.append(StageSpec(method=method.name, params=params))
    fields = top.model_dump(exclude={"stages", "name"})
    return Recipe(name=top.name or name, stages=stages, **fields)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `key.path=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"recipe file not found: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:  # before reading it: a recipe is a few hundred bytes
        raise CompressError(f"{path}: {path.stat().st_size:,} bytes, more than a recipe's {MAX_RECIPE_BYTES:,}")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CompressError(f"{path}: not valid YAML{where} ({getattr(error, 'problem', None) or error})") from None
    data = copy.deepcopy(data) if isinstance(data, dict) else data
    for assignment in overrides:
        if not isinstance(data, dict):
            break
        apply_override(data, assignment)
    return validate_recipe(data, name=path.stem)
