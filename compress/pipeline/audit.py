"""`compress audit OUT`: check a finished output against what its report claims.

Per target (fused experts included): the checkpoint's achieved sparsity equals the report's; the
zeros of its mask are zeros; an N:M stage's pattern holds in every group; a quantized target's
weights are exactly what its packed form dequantizes to, and no group holds more distinct values
than 2^bits (outliers aside). Overall: bits/param recomputed from the packed file's bytes. The
checks read the files only; nothing is trusted from the run that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.formats.packed_file import PACKED_FILE
from compress.pipeline.export import REPORT_FILE
from compress.pipeline.stages import plan_stages
from compress.pipeline.store import MODEL_DIR
from compress.recipe import Recipe, validate_recipe
from compress.state import STATE_FILE, CompressionState


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
    from compress.model.load import load_model
    from compress.model.targets import discover
    from compress.pipeline.metrics import stored_bits_per_param

    out = Path(out_dir)
    if not (out / REPORT_FILE).is_file():
        raise CompressError(f"{out} holds no {REPORT_FILE}: not a compress output")
    report = json.loads((out / REPORT_FILE).read_text())
    recipe = _recipe_of(report, out / MODEL_DIR)
    loaded = load_model(recipe.model)
    layout = discover(loaded.model)
    planned = plan_stages(recipe, layout)
    state = CompressionState.load(out) if (out / STATE_FILE).is_file() else CompressionState()
    by_name = {t.name: t for t in layout.targets}
    patterns: dict[str, str] = {}
    for stage, spec in zip(planned, recipe.stages):
        pattern = getattr(spec.params, "pattern", None)
        if pattern and pattern != "unstructured":
            patterns.update({t.name: pattern for t in stage.targets})

    problems: dict[str, list[str]] = {}
    for name, claimed in report["targets"].items():
        found = []
        target = by_name.get(name)
        if target is None:
            problems[name] = ["not in the checkpoint"]
            continue
        stored = target.weight.to(loaded.storage_dtype)  # what the checkpoint holds
        sparsity = float((stored == 0).sum()) / stored.numel()
        if abs(sparsity - claimed["sparsity"]) > 0.5 / stored.numel():
            found.append(f"sparsity {sparsity:.6f}, report says {claimed['sparsity']:.6f}")
        entry = state.targets.get(name)
        if entry is not None and entry.mask is not None and bool((stored[~entry.mask] != 0).any()):
            found.append(f"{int((stored[~entry.mask] != 0).sum())} weights its mask prunes are not zero")
        if name in patterns and (bad := _nm_violations(stored, patterns[name])):
            found.append(f"{bad} groups break the {patterns[name]} pattern")
        quantized = claimed.get("quantized")
        packed = entry.quantized if entry is not None else None
        if quantized and packed is None:
            found.append("report says quantized, packed file has no entry")
        elif packed is not None:
            differ = int((packed.dequantize().to(loaded.storage_dtype) != stored).sum())
            if differ:
                found.append(f"{differ} weights differ from what the packed form dequantizes to")
            skip = torch.zeros(stored.shape, dtype=torch.bool)
            if packed.outliers is not None:
                rows, cols = packed.outliers.positions()
                skip[rows.long(), cols.long()] = True
            if packed.keep is not None:
                skip |= ~packed.keep
            limit = 2 ** packed.bits
            # codes, outliers and the keep mask are in the packed (possibly permuted) column order
            in_packed_order = stored.float()[:, packed.perm.long()] if packed.perm is not None else stored.float()
            distinct = _max_distinct_per_group(in_packed_order, packed.group_size, skip)
            if distinct > limit:
                found.append(f"a group holds {distinct} distinct values, more than 2^{packed.bits}")
        if found:
            problems[name] = found

    packed_file = out / PACKED_FILE
    packed_bytes = packed_file.stat().st_size if packed_file.exists() else 0
    shapes = [t["shape"] for t in report["targets"].values()]
    quantized_params = sum(s[0] * s[1] for s, t in zip(shapes, report["targets"].values()) if t.get("quantized"))
    bits = stored_bits_per_param([s[0] * s[1] for s in shapes], torch.finfo(loaded.storage_dtype).bits, packed_bytes, quantized_params)
    overall = []
    claimed_bits = report["metrics"].get("bits_per_param")
    if claimed_bits is not None and abs(bits - claimed_bits) > 1e-9:
        overall.append(f"bits/param from the packed bytes is {bits:.6f}, report says {claimed_bits:.6f}")
    if overall:
        problems["(output)"] = overall
    return {"ok": not problems, "problems": problems, "checked": len(report["targets"]), "bits_per_param": bits}
