"""`compress.load`: a packed folder as a model whose packed targets run on the kernels (through
transformers' from_pretrained and the registered quantizer, compress/deploy/hf.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compress.deploy.packed_model import PACKED_DIR, read_quantization_config
from compress.errors import CompressError

REPORT_FILE = "report.json"


def packed_folder(out: str | Path) -> Path:
    """The packed folder of an output folder (OUT/packed), or OUT itself when it is one."""
    folder = Path(out)
    if (folder / PACKED_DIR / "config.json").is_file():
        return folder / PACKED_DIR
    if (folder / "config.json").is_file():
        return folder
    raise CompressError(f"{folder} holds no packed model (no {PACKED_DIR}/config.json): give an output folder of `compress run`")


def load_packed(out: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                kind: str | None = None) -> nn.Module:
    """The model of a packed folder (or of OUT/packed), in eval mode. `kind`: "causal" (a causal LM,
    default) or "encoder"; read from OUT/report.json when there is one. `dtype`: of the activations and
    of the unpacked tensors (default: the config's); the packed buffers keep their stored dtypes."""
    from transformers import AutoModel, AutoModelForCausalLM

    from compress.deploy.hf import register

    folder = packed_folder(out)
    try:
        read_quantization_config(folder)
    except ValueError as error:
        raise CompressError(str(error)) from None
    if kind is None:
        report = folder.parent / REPORT_FILE
        kind = json.loads(report.read_text()).get("model", {}).get("kind", "causal") if report.is_file() else "causal"
    register()
    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = auto.from_pretrained(folder, dtype=dtype) if dtype is not None else auto.from_pretrained(folder)
    return (model.to(device) if device is not None else model).eval()
