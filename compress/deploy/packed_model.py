"""The `packed/` folder: a Hugging Face model folder whose compressed targets are stored in their
kernel-ready formats (compress/formats/) instead of as dense weights.

  config.json        the model's config plus a `quantization_config` section:
                       quant_method "compress", format "compress-packed-model/1",
                       targets: {module name: {format meta..., "tensors": {field: [dtype, shape]}}}
                       dense_targets: {module name: why it is stored dense}
  model.safetensors  (or shards + model.safetensors.index.json) every tensor of the model: a packed
                     target's as `<module>.<field>` (its format's tensors, the bias as `<module>.bias`),
                     everything else as in the dense checkpoint
  tokenizer and generation files, copied

The tensor specs let a loader allocate every packed buffer before reading the file (transformers builds
the model on the meta device first). bits/param is counted from the written files' headers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from compress import __version__
from compress.formats import ternary_dict
from compress.formats.choose import pack_target
from compress.formats.packed_file import target_of
from compress.formats.registry import format_module, tensor_specs
from compress.model.checkpoint import INDEX_FILE, WEIGHT_SUFFIXES, CheckpointFiles, read_header
from compress.progress import bar
from compress.state import CompressionState, PackedOnDisk

PACKED_DIR = "packed"
FORMAT = "compress-packed-model/1"
QUANT_METHOD = "compress"
WEIGHTS_FILE = "model.safetensors"
SHARD_BYTES = 2 << 30  # a shard is written once it holds this much: a 7B model is never held whole


def write_packed_model(dense_dir: Path, state: CompressionState, targets: list[str], folder: Path) -> dict[str, Any]:
    """Write `folder` from the dense checkpoint `dense_dir` and the final compression state; returns
    {"targets": {name: {"format"[, "reason"]}}, "target_bytes", "by_target", "bytes", "static_dictionary_bytes"}.

    A fused-experts tensor [E, ...] is stored per expert (`<experts>.<e>.<param>.<field>`) when every
    expert of it is a target that packs and its module has the layout compress/kernels/experts.py runs;
    otherwise whole and dense, as the checkpoint holds it."""
    files = CheckpointFiles(dense_dir)
    linear = {name for name in targets if f"{name}.weight" in files.where}
    fused = _fused_targets(targets, files)
    folder.mkdir(parents=True)
    layout: dict[str, dict] = {}
    dense: dict[str, str] = {}
    static: dict[str, int] = {}  # dictionary-coded targets: their bytes with the reference's static dictionary
    shards: list[Path] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            shard = folder / f".part-{len(shards):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in pending.items()}, str(shard), metadata={"format": "pt"})
            shards.append(shard)
        pending, pending_bytes = {}, 0

    for key in bar(iterable=sorted(files.where), desc="packing", unit="tensors"):
        tensor = files.read([key])[key]
        module, _, field = key.rpartition(".")
        stored = {key: tensor}
        if field == "weight" and module in linear:
            packed, reason = _pack(state, module, tensor)
            if packed is None:
                dense[module] = reason
            else:
                layout[module] = {**packed.meta, "tensors": tensor_specs(packed)}
                stored = format_module(packed.meta).to_tensors(packed, module)
                static.update(_static_dictionary_bytes(module, packed))
        elif key in fused:
            names, why = fused[key], fused_layout_problem(files, module)
            results = [(None, why)] if why else [_pack(state, name, tensor[e]) for e, name in enumerate(names)]
            reason = next((r for p, r in results if p is None), None)
            if reason is not None:
                dense.update({name: f"fused MoE experts stored dense: {reason}" for name in names if name in targets})
            else:
                stored = {}
                for name, (packed, _) in zip(names, results):
                    layout[name] = {**packed.meta, "tensors": tensor_specs(packed)}
                    stored.update(format_module(packed.meta).to_tensors(packed, name))
                    static.update(_static_dictionary_bytes(name, packed))
        pending.update(stored)
        pending_bytes += sum(t.numel() * t.element_size() for t in stored.values())
        if pending_bytes >= SHARD_BYTES:
            flush()
    flush()
    names = [WEIGHTS_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    umask = os.umask(0)
    os.umask(umask)
    for shard, name in zip(shards, names):
        os.replace(shard, folder / name)
        os.chmod(folder / name, 0o666 & ~umask)  # safetensors writes 0600: a deployable model is readable like its config
        weight_map.update({key: name for key in read_header(folder / name)})
    if len(names) > 1:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    _write_config(dense_dir, folder, layout, dense)
    return {"targets": {**{name: {"format": info["format"]} for name, info in layout.items()},
                        **{name: {"format": "dense", "reason": why} for name, why in dense.items()}},
            "static_dictionary_bytes": static, **stored_bytes(folder, targets)}


def _static_dictionary_bytes(name: str, packed) -> dict[str, int]:
    """{name: bytes} of a dictionary-coded target coded with the reference's static dictionary instead
    (counted from the tensors that coding would store), to report beside the adaptive one it is stored with."""
    if packed.meta["format"] != ternary_dict.FORMAT or packed.dictionary == "static":
        return {}
    alternative = ternary_dict.from_ternary(ternary_dict.symbols_of(packed), packed.minmax, "static")
    return {name: ternary_dict.nbytes(alternative)}


def _pack(state: CompressionState, name: str, weight: torch.Tensor):
    """(packed weight, None) or (None, why dense) for one target's stored weight and its state."""
    entry = state.targets.get(name)
    quantized = entry.quantized.load() if entry is not None and isinstance(entry.quantized, PackedOnDisk) else (
        entry.quantized if entry is not None else None)
    return pack_target(weight, entry.mask if entry is not None else None, quantized)


def _fused_targets(targets: list[str], files: CheckpointFiles) -> dict[str, list[str]]:
    """{fused tensor key: the target name of each of its experts, in order} for fused tensors whose
    every expert is a target."""
    experts: dict[str, dict[int, str]] = {}
    for name in targets:
        head, expert, param = fused_parts(name)
        if expert is not None and f"{head}.{param}" in files.where:
            experts.setdefault(f"{head}.{param}", {})[expert] = name
    fused = {}
    for key, by_index in experts.items():
        count = read_header(files.folder / files.where[key])[key]["shape"][0]
        if sorted(by_index) == list(range(count)):
            fused[key] = [by_index[e] for e in range(count)]
    return fused


def fused_layout_problem(files: CheckpointFiles, experts: str) -> str | None:
    """Why the fused experts module `experts` cannot be stored per expert (None: it can): its tensors
    must be exactly the gate_up / down pair compress/kernels/experts.py runs."""
    from compress.kernels.experts import FUSED_PARAMS

    found = sorted(key.rpartition(".")[2] for key in files.where if key.rpartition(".")[0] == experts)
    if found != sorted(FUSED_PARAMS):
        return f"experts with tensors {found} (the packed experts module runs {list(FUSED_PARAMS)} without biases)"
    return None


def _write_config(dense_dir: Path, folder: Path, layout: dict[str, dict], dense: dict[str, str]) -> None:
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format": FORMAT, "compress_version": __version__,
                                     "targets": layout, "dense_targets": dense}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for file in sorted(dense_dir.iterdir()):  # tokenizer, generation config
        if file.is_file() and file.name != "config.json" and not file.name.endswith(WEIGHT_SUFFIXES) and not file.name.startswith("."):
            shutil.copy2(file, folder / file.name)


def stored_bytes(folder: Path, targets: list[str]) -> dict[str, Any]:
    """{"target_bytes": bytes of the target weights' tensors (packed or dense; biases aside), "bytes":
    every file of the folder, "by_target": {target: its bytes}}, read from the safetensors headers as
    written. A fused-experts tensor [E, ...] stored whole counts 1/E of its bytes for each expert target."""
    wanted = set(targets)
    experts: dict[str, list[str]] = {}  # fused tensor key -> its experts that are targets
    for name in targets:
        head, expert, param = fused_parts(name)
        if expert is not None:
            experts.setdefault(f"{head}.{param}", []).append(name)
    by_target: dict[str, int] = dict.fromkeys(targets, 0)
    for file in sorted(folder.glob("*.safetensors")):
        for key, info in read_header(file).items():
            start, end = info["data_offsets"]
            if key in experts:
                for name in experts[key]:
                    by_target[name] += (end - start) // info["shape"][0]
            elif not key.endswith(".bias") and (owner := target_of(key, wanted)) is not None:
                by_target[owner] += end - start
    return {"target_bytes": sum(by_target.values()), "by_target": by_target,
            "bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())}


def fused_parts(name: str) -> tuple[str, int | None, str]:
    """("p.experts", 3, "gate_up_proj") for a fused expert target "p.experts.3.gate_up_proj"."""
    head, _, param = name.rpartition(".")
    parent, _, index = head.rpartition(".")
    return (parent, int(index), param) if index.isdigit() else (head, None, param)


def read_quantization_config(folder: Path) -> dict[str, Any]:
    """The `quantization_config` of a packed folder (ValueError when the folder is not one)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json: not a packed model folder")
    section = json.loads(config_file.read_text()).get("quantization_config") or {}
    if section.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{folder} is not a compress packed model (quantization_config.quant_method is {section.get('quant_method')!r})")
    if section.get("format") != FORMAT:
        raise ValueError(f"{folder}: packed model format {section.get('format')!r}; this version reads {FORMAT!r}")
    return section


def dense_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a packed folder as a dense checkpoint holds it: packed targets unpacked to the
    config's dtype (`<module>.weight`), the rest as stored. For inspection: it builds every dense weight."""
    from compress.formats.registry import from_tensors, unpack

    section = read_quantization_config(folder)
    dtype = config_dtype(folder)
    files = CheckpointFiles(Path(folder))
    tensors = files.read(list(files.where))
    for name, info in section["targets"].items():
        parts = {f"{name}.{field}": tensors.pop(f"{name}.{field}") for field in info["tensors"]}
        packed = from_tensors(parts, name, {k: v for k, v in info.items() if k != "tensors"})
        tensors[f"{name}.weight"] = unpack(packed).to(dtype)
    return tensors


def config_dtype(folder: Path) -> torch.dtype:
    """The dtype a model folder's config.json declares for its weights (float32 when it declares none)."""
    from compress.formats.registry import DTYPES

    config = json.loads((Path(folder) / "config.json").read_text())
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
