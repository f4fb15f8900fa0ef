"""Per-layer error: each stage records every target's relative output error on the calibration
inputs, ||WX - W'X||^2 / ||WX||^2, computed from X^T X."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_recipe

from compress.calibration.layerwise import relative_output_error
from compress.pipeline.engine import run
from compress.recipe import validate_recipe


def test_matches_the_direct_computation():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator)
    w = torch.randn(8, 16, generator=generator)
    w2 = w + 0.1 * torch.randn(8, 16, generator=generator)
    direct = float(((w - w2) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())
    assert relative_output_error(w, w2, x.T @ x) == pytest.approx(direct, rel=1e-5)
    assert relative_output_error(w, w, x.T @ x) == 0.0
    assert relative_output_error(w, torch.zeros_like(w), x.T @ x) == pytest.approx(1.0, rel=1e-6)


def test_gptq_has_lower_layer_error_than_rtn(tmp_path):
    """GPTQ minimises exactly this error column by column; RTN ignores the inputs."""
    reports = {m: run(validate_recipe(fast_recipe({"method": m, "bits": 3})), tmp_path / m) for m in ("rtn", "gptq")}
    for report in reports.values():
        assert all("0" in t["layer_error"] and t["seconds"]["0"] >= 0 for t in report["targets"].values())
        assert report["metrics"]["layer_error_max"] >= report["metrics"]["layer_error_mean"] > 0
    rtn, gptq = (reports[m]["targets"] for m in ("rtn", "gptq"))
    better = sum(gptq[name]["layer_error"]["0"] < rtn[name]["layer_error"]["0"] for name in rtn)
    assert better == len(rtn)
    assert reports["gptq"]["metrics"]["layer_error_mean"] < 0.7 * reports["rtn"]["metrics"]["layer_error_mean"]


def test_each_stage_of_a_chain_has_its_own_error(tmp_path):
    report = run(validate_recipe(fast_recipe({"method": "magnitude", "sparsity": 0.5}, {"method": "rtn", "bits": 4})), tmp_path / "o")
    target = next(iter(report["targets"].values()))
    assert set(target["layer_error"]) == {"0", "1"}
    assert [s["layer_error_max"] is not None for s in report["stages"]] == [True, True]
