"""A method defined outside the package (its own file, here this one) runs through a recipe: a
per-target method gets exactly the statistics it names; a whole-model method gets the model and the
state, and a later stage keeps the zeros it leaves."""

from __future__ import annotations

import torch
from conftest import checkpoint_tensors, exported_tensors, fast_recipe

import compress
from compress.methods import register
from compress.methods.base import CalibrationData, ModelMethod, StageParams, TargetMethod, TargetResult
from compress.methods.registry import _METHODS
from compress.model.targets import discover

SEEN: dict[str, set[str]] = {}


class HalveParams(StageParams):
    factor: float = 0.5


class Halve(TargetMethod):
    """Scales every target by `factor`; records which statistics it was handed."""

    name = "toy-halve"
    Params = HalveParams
    statistics = ("input_sq_norm",)

    def compress_target(self, weight, statistics, mask, dense=None):
        SEEN.setdefault("statistics", set()).update(statistics)
        return TargetResult(weight=weight * self.params.factor, mask=mask)


class GlobalParams(StageParams):
    sparsity: float = 0.3


class GlobalMagnitude(ModelMethod):
    """Prunes the smallest weights over all targets at once (one threshold for the whole model)."""

    name = "toy-global-magnitude"
    Params = GlobalParams

    def apply(self, model, state, data: CalibrationData):
        SEEN["device"] = {str(data.device)}
        targets = [t for t in discover(model).targets if t.name in {s.name for s in self.targets}]
        magnitudes = torch.cat([t.weight.detach().abs().flatten().float() for t in targets])
        threshold = magnitudes.kthvalue(int(magnitudes.numel() * self.params.sparsity)).values
        with torch.no_grad():
            for target in targets:
                keep = target.weight.abs() > threshold
                target.weight.mul_(keep)
                state.get(target.name).mask = keep.cpu()
        return state

    def restrict_targets(self, targets):
        self.targets = targets
        return targets


for method in (Halve, GlobalMagnitude):
    if method.name not in _METHODS:
        register(method)


def test_a_per_target_method_from_outside_runs_through_a_recipe(tmp_path):
    recipe = fast_recipe({"method": "toy-halve", "targets": {"include": ["*.mlp.down_proj"]}}, evaluate={"layer_error": False})
    report = compress.run(recipe, out=tmp_path / "out", track=False)
    assert SEEN["statistics"] == {"input_sq_norm", "tokens_per_sequence"}  # what it named, nothing more
    before = checkpoint_tensors(compress.embedded_model())
    after = exported_tensors(tmp_path / "out")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(after[name], (before[name].float() * 0.5).to(before[name].dtype))
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    assert report["stages"][0]["targets"] == 4 and report["metrics"]["perplexity"] > 0


def test_a_whole_model_method_hands_its_masks_to_the_next_stage(tmp_path):
    recipe = fast_recipe({"method": "toy-global-magnitude", "sparsity": 0.3}, {"method": "gptq", "bits": 4, "group_size": 64})
    report = compress.run(recipe, out=tmp_path / "out", track=False)
    # one threshold over the model: 30% of all target weights, not of each
    per_target = [t["sparsity"] for t in report["targets"].values()]
    assert abs(report["stages"][0]["sparsity"] - 0.3) < 1e-3 and max(per_target) - min(per_target) > 0.05
    assert report["audit"]["ok"], report["audit"]["problems"]  # quantized weights kept every zero of the mask
    assert report["metrics"]["sparsity"] >= 0.3 - 1e-3
    assert SEEN["device"] == {"cpu"}
