"""`compress audit OUT`: check a finished output against what its report claims.

Per target (fused experts included), read from packed/ (a packed target unpacked from its format's
tensors, each checked): the achieved sparsity equals the report's; an N:M stage's pattern holds in
every group; the stored format and code width are the report's; no group of a uniform-grid format
holds more distinct values than 2^bits; with model/ written, its dense weights are exactly what
packed/ holds. Overall: bits/param recomputed from the bytes of packed/. The checks read the files
only; nothing is trusted from the run that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.model.checkpoint import CheckpointFiles
from compress.model.targets import discover
from compress.pipeline.export import REPORT_FILE
from compress.pipeline.stages import plan_stages
from compress.pipeline.store import MODEL_DIR
from compress.recipe import Recipe, validate_recipe


def _recipe_of(report: dict[str, Any], model_dir: Path) -> Recipe:
    data = dict(report["recipe"])
    data["stages"] = [{"method": s["method"], **s["params"]} for s in data["stages"]]
    data["model"] = {**data["model"], "source": str(model_dir), "device": "cpu"}
    return validate_recipe(data, name=data.get("name") or "recipe")


def _nm_violations(weight: torch.Tensor, pattern: str) -> int:
    """Groups of M consecutive input weights with more than N non-zeros."""
    n, m = (int(x) for x in pattern.split(":"))
    groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
    return int((groups > n).sum())


def _max_distinct_per_group(weight: torch.Tensor, group_size: int, skip: torch.Tensor) -> int:
    """Most distinct kept values in any (row, group), positions in `skip` (outliers, pruned) aside."""
    rows, cols = weight.shape
    pad = (-cols) % group_size  # a last, shorter group: pad with skipped positions
    values = torch.nn.functional.pad(weight.float(), (0, pad)).masked_fill(
        torch.nn.functional.pad(skip, (0, pad), value=True), float("nan"))
    ordered = values.reshape(rows, -1, group_size).sort(dim=-1).values  # NaN (skipped) sort last
    present = ~ordered.isnan()
    new = present.clone()
    new[..., 1:] &= ordered[..., 1:] != ordered[..., :-1]
    return int(new.sum(dim=-1).max()) if new.numel() else 0


def audit_step(out_dir: Path) -> dict[str, Any]:
    """The flow's last step: audit the output and record the result in its report.json."""
    import os

    result = audit_output(out_dir)
    path = Path(out_dir) / REPORT_FILE
    report = json.loads(path.read_text())
    report["audit"] = result
    report["metrics"]["audit_ok"] = int(result["ok"])
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(path)  # atomic: a reader sees the old report or the new one
    return report


def audit_output(out_dir: str | Path) -> dict[str, Any]:
    """{"ok": bool, "problems": {target: [what is wrong]}, "checked": n, ...} for a finished output."""
    from compress.deploy.packed_model import PACKED_DIR, stored_bytes

    out = Path(out_dir)
    if not (out / REPORT_FILE).is_file():
        raise CompressError(f"{out} holds no {REPORT_FILE}: not a compress output")
    report = json.loads((out / REPORT_FILE).read_text())
    packed_dir = out / PACKED_DIR
    stored = StoredWeights(packed_dir)
    recipe = _recipe_of(report, packed_dir)
    layout = discover(stored.skeleton())
    planned = plan_stages(recipe, layout)
    by_name = {t.name: t for t in layout.targets}
    patterns: dict[str, str] = {}
    for stage, spec in zip(planned, recipe.stages):
        pattern = getattr(spec.params, "pattern", None)
        if pattern and pattern != "unstructured":
            patterns.update({t.name: pattern for t in stage.targets})
    dense_checkpoint = CheckpointFiles(out / MODEL_DIR) if (out / MODEL_DIR).is_dir() else None

    problems: dict[str, list[str]] = {}
    for name, claimed in report["targets"].items():
        found = []
        target = by_name.get(name)
        if target is None:
            problems[name] = ["not in the model"]
            continue
        try:
            weight, meta, mask = stored.weight(target)
        except (KeyError, ValueError) as error:
            problems[name] = [f"packed/ does not hold it readably: {error}"]
            continue
        at_storage = weight.to(stored.dtype)
        if mask is not None:  # the format's own mask: pruned weights
            sparsity = float((~mask).sum()) / weight.numel()
            if bad := int((at_storage[~mask] != 0).sum()):
                found.append(f"{bad} weights its mask prunes are not zero")
        else:  # no mask stored: every zero may be a pruned weight; at least the report's share must be zero
            sparsity = min(float((at_storage == 0).sum()) / weight.numel(), claimed["sparsity"])
        if abs(sparsity - claimed["sparsity"]) > 0.5 / weight.numel():
            found.append(f"sparsity {sparsity:.6f}, report says {claimed['sparsity']:.6f}")
        if name in patterns and (bad := _nm_violations(at_storage, patterns[name])):
            found.append(f"{bad} groups break the {patterns[name]} pattern")
        stored_format = meta["format"] if meta else "dense"
        if claimed.get("format", stored_format) != stored_format:
            found.append(f"stored as {stored_format}, report says {claimed['format']}")
        quantized = claimed.get("quantized")
        if quantized and meta and meta["format"] == "ternary_dict":  # QMoE: every row holds its min, 0 and its max only
            if not quantized.get("ternary"):
                found.append(f"stored as ternary, report says {quantized['bits']}-bit codes")
            if (rows := int((_distinct_per_row(weight) > 3).sum())):
                found.append(f"{rows} rows hold more than 3 distinct values")
        elif quantized and meta and meta.get("bits") != quantized["bits"]:
            found.append(f"stored with {meta.get('bits')}-bit codes, report says {quantized['bits']}")
        if quantized and meta and meta["format"] in UNIFORM_GROUP_FORMATS:
            distinct = _max_distinct_per_group(weight, meta["group_size"], weight == 0)
            if distinct > 2 ** meta["bits"]:
                found.append(f"a group holds {distinct} distinct values, more than 2^{meta['bits']}")
        if dense_checkpoint is not None and target.expert is None and meta:
            checkpoint = dense_checkpoint.read([f"{name}.weight"])[f"{name}.weight"]
            if differ := int((checkpoint != at_storage).sum()):
                found.append(f"{differ} weights of model/ differ from what packed/ holds")
        if found:
            problems[name] = found

    target_bytes = stored_bytes(packed_dir, list(report["targets"]))["target_bytes"]
    params = sum(t["shape"][0] * t["shape"][1] for t in report["targets"].values())
    bits = 8 * target_bytes / params if params else 0.0
    overall = []
    claimed_bits = report["metrics"].get("bits_per_param")
    if claimed_bits is not None and abs(bits - claimed_bits) > 1e-9:
        overall.append(f"bits/param from the packed bytes is {bits:.6f}, report says {claimed_bits:.6f}")
    if overall:
        problems["(output)"] = overall
    return {"ok": not problems, "problems": problems, "checked": len(report["targets"]), "bits_per_param": bits}


def _distinct_per_row(weight: torch.Tensor) -> torch.Tensor:
    """How many distinct values each row holds (0 counted like any other)."""
    ordered = weight.sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)


UNIFORM_GROUP_FORMATS = ("group_quant", "sparse_quant")  # no outliers or permutation: every group is on one grid


class StoredWeights:
    """The weights of a packed folder as stored: a packed target unpacked from its format's tensors,
    a dense one (or a fused expert) read as is; and the model's skeleton, built on the meta device."""

    def __init__(self, folder: Path) -> None:
        from compress.deploy.packed_model import config_dtype, read_quantization_config

        if not (folder / "config.json").is_file():
            raise CompressError(f"{folder.parent} holds no packed model ({folder.name}/config.json): not a complete compress output")
        self.folder = folder
        self.files = CheckpointFiles(folder)
        self.layout = read_quantization_config(folder)["targets"]
        self.dtype = config_dtype(folder)

    def skeleton(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.folder)
        config.quantization_config = None  # the structure only: no quantizer on the meta device
        auto = AutoModelForCausalLM if getattr(config, "architectures", None) and any(
            a.endswith("ForCausalLM") for a in config.architectures) else AutoModel
        with torch.device("meta"):
            return auto.from_config(config)

    def weight(self, target) -> tuple[torch.Tensor, dict | None, torch.Tensor | None]:
        """(float32 [out, in] weight, its format meta, the format's kept mask), read once; meta and mask
        are None when stored dense, the mask also for a format that keeps every weight."""
        from compress.formats.registry import from_tensors, kept_mask, unpack

        meta = self.layout.get(target.name)
        if meta is not None:
            keys = [f"{target.name}.{field}" for field in meta["tensors"]]
            packed = from_tensors(self.files.read(keys), target.name, {k: v for k, v in meta.items() if k != "tensors"})
            return unpack(packed), meta, kept_mask(packed)
        if target.expert is None:
            key = f"{target.name}.weight"
            return self.files.read([key])[key].float(), None, None
        head, _, param = target.name.rpartition(".")
        key = f"{head.rpartition('.')[0]}.{param}"
        return self.files.read([key])[key][target.expert].float(), None, None
