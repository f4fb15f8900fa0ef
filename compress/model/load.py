"""Loading the model to compress: a local folder or a hub id, a causal LM or an encoder."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.errors import CompressError

if TYPE_CHECKING:  # the recipe's model section; this layer takes it as it is and imports no recipe code
    from compress.recipe import ModelSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_model_path() -> Path:
    return Path(str(resources.files("compress") / "assets" / "model"))


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    kind: str  # "causal" or "encoder"
    device: torch.device
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype  # the checkpoint's own dtype: weights are rounded to it and saved in it


def _looks_like_local_path(source: str) -> bool:
    # A hub id is "name" or "org/name"; anything else (./x, /x, ~/x, a/b/c, x.d) is a path on disk.
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).exists()


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise CompressError(f"model.device: unknown device {requested!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressError("model.device: cuda requested but no CUDA device is available")
    return device


def resolve_source(spec: ModelSpec) -> str:
    """The path or hub id to load; checks a local path exists before anything heavy happens."""
    if spec.source is None:
        return str(embedded_model_path())
    source = spec.source
    if _looks_like_local_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise CompressError(f"model path not found: {source}")
        if not (path / "config.json").is_file():
            raise CompressError(f"model path {source} has no config.json: not a Hugging Face model folder")
        return str(path)
    return source


def materialize_source(spec: ModelSpec) -> tuple[Path, str]:
    """(local folder holding the model, source as the user named it). A hub id is fetched into the
    Hugging Face cache first, so every later step reads the same files and can hash them."""
    source = resolve_source(spec)
    if _looks_like_local_path(source) or spec.source is None:
        return Path(source), spec.source or "<embedded model>"
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=source)), source
    except Exception as error:  # the hub client raises many types (offline, gated, not found)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressError(f"could not fetch model {source!r} from the hub: {first_line}") from None


def resolve_kind(source: str, kind: str) -> str:
    """The recipe's kind, or for "auto" what the config's architectures say."""
    return _detect_kind(source) if kind == "auto" else kind


def _detect_kind(source: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return "causal"
    return "encoder"


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint stores its weights in, read from a safetensors header (no weights)."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                dtype = _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def compute_dtype_for(spec: ModelSpec, storage_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The recipe's dtype, else float32 on CPU (bf16 matmuls there are slow and less exact) and the
    checkpoint's own dtype on CUDA."""
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    return storage_dtype if device.type == "cuda" else torch.float32


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model and tokenizer; compute dtype float32 on CPU, the checkpoint's dtype on CUDA."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading is quick; our own bars show the long work
    source = resolve_source(spec)
    device = pick_device(spec.device)
    try:
        kind = resolve_kind(source, spec.kind)
        loader = AutoModelForCausalLM if kind == "causal" else AutoModel
        model = loader.from_pretrained(source, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressError(f"could not load model {source!r}: {first_line}") from None
    storage_dtype = next(model.parameters()).dtype
    compute_dtype = compute_dtype_for(spec, storage_dtype, device)
    model.to(compute_dtype)
    model.eval()
    return LoadedModel(model, tokenizer, source, kind, device, compute_dtype, storage_dtype)
