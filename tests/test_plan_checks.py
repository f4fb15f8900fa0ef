"""`compress plan` catches every fault it can before any work, each as one `error: ...` line and exit
code 2: checkpoint files against the model's skeleton (headers only), texts against the windows
asked for, memory estimates against the machine, and recipes too large or too deep to parse."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import compress
from compress.calibration.data import check_calibration_text
from compress.cli import main
from compress.errors import CompressError
from compress.pipeline import checks
from compress.pipeline.plan import StagePlan, build_plan
from compress.recipe import CalibrationSpec, load_recipe, validate_recipe


@pytest.fixture
def model_copy(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(compress.embedded_model(), folder)
    return folder


def plan_error(capsys, *args: str) -> str:
    """The one stderr line of a `compress plan` that must fail with exit code 2."""
    code = main(["plan", "recipes/wanda-50.yaml", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# --- 1. the checkpoint's tensors against the skeleton -------------------------------------------


def test_a_tensor_of_the_wrong_shape_is_refused_by_plan(model_copy, capsys):
    rewrite(model_copy, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(384, 100, dtype=torch.bfloat16)}))
    line = plan_error(capsys, "--model", str(model_copy))
    assert line == (f"error: model file {model_copy / 'model.safetensors'}: tensor model.layers.1.mlp.up_proj.weight has shape "
                    f"[384, 100]; the model's config.json expects [384, 128]")
    rewrite(model_copy, lambda t: t.update({"extra.weight": torch.zeros(2)}))  # unknown keys beside the model's own: still streamed
    assert "tensor model.layers.1.mlp.up_proj.weight has shape [384, 100]" in plan_error(capsys, "--model", str(model_copy))


def test_a_missing_tensor_and_a_quantized_dtype_are_refused(model_copy, capsys):
    rewrite(model_copy, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    assert "lack tensor model.layers.2.self_attn.k_proj.weight" in plan_error(capsys, "--model", str(model_copy))
    shutil.copy2(compress.embedded_model() / "model.safetensors", model_copy / "model.safetensors")
    rewrite(model_copy, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.float8_e4m3fn)}))
    assert "tensor model.norm.weight is stored as F8_E4M3; the model expects a float" in plan_error(capsys, "--model", str(model_copy))


def test_valid_layouts_still_plan(model_copy, tiny_mixtral):
    """float32 weights for a bfloat16 config, the tied head stored too, shards with an index, and a
    file in another layout (Mixtral's per-expert w1/w2/w3, fused by transformers on load)."""
    rewrite(model_copy, lambda t: t.update({**{k: v.float() for k, v in t.items()}, "lm_head.weight": t["model.embed_tokens.weight"]}))
    recipe = {"stages": [{"method": "wanda", "sparsity": 0.5}], "calibration": {"nsamples": 4, "seqlen": 64}}
    assert build_plan(validate_recipe({**recipe, "model": str(model_copy)})).streams
    tensors = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, model_copy / shard)
    index = {"weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert build_plan(validate_recipe({**recipe, "model": str(model_copy)})).streams
    assert not build_plan(validate_recipe({**recipe, "model": str(tiny_mixtral)})).streams
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CompressError, match="names 1 shard\\(s\\) that are not there: model-00002-of-00002.safetensors"):
        build_plan(validate_recipe({**recipe, "model": str(model_copy)}))


# --- 2. a truncated file ------------------------------------------------------------------------


def test_a_truncated_model_file_is_one_line_from_plan(model_copy, capsys):
    file = model_copy / "model.safetensors"
    os.truncate(file, file.stat().st_size // 2)
    line = plan_error(capsys, "--model", str(model_copy))
    assert line.startswith(f"error: model file {file} is truncated or corrupt: its header declares 3672320 bytes of tensor data")
    os.truncate(file, 5)
    assert plan_error(capsys, "--model", str(model_copy)).startswith(f"error: model file {file} is truncated or corrupt")


# --- 3. texts and sequence lengths --------------------------------------------------------------


def test_seqlen_past_the_models_context_is_refused_by_plan(capsys):
    assert plan_error(capsys, "--set", "calibration.seqlen=100000") == (
        "error: calibration.seqlen=100000 is longer than the model's context (512 positions): lower it to 512 or less")
    assert plan_error(capsys, "--set", "evaluate.seqlen=1024").startswith("error: evaluate.seqlen=1024 is longer than the model's context")


def test_a_calibration_text_shorter_than_seqlen_is_refused_by_plan(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question. " * 4)
    line = plan_error(capsys, "--set", f"calibration.text={short}")
    assert line.startswith(f"error: calibration text ({short}) has ") and line.endswith("tokens; calibration.seqlen=256 needs more")
    long_enough = tmp_path / "long.txt"
    long_enough.write_text("To be, or not to be, that is the question. " * 100)
    assert main(["plan", "recipes/wanda-50.yaml", "--set", f"calibration.text={long_enough}"]) == 0
    assert main(["plan", "recipes/magnitude-50.yaml", "--set", f"calibration.text={short}", "--set", "evaluate.layer_error=false"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(compress.embedded_model())  # the embedded text: ~120k tokens
    with pytest.raises(CompressError, match="^calibration text \\(<embedded train.txt>\\) has 120610 tokens; calibration.seqlen=200000"):
        check_calibration_text(CalibrationSpec(seqlen=200_000), tokenizer)
    check_calibration_text(CalibrationSpec(seqlen=100_000), tokenizer)


# --- 4. memory ----------------------------------------------------------------------------------


def test_a_plan_larger_than_the_machine_is_refused(capsys, monkeypatch):
    line = plan_error(capsys, "--set", "calibration.nsamples=1000000000")
    assert "stage 0 (wanda) needs ~119.2 TB of host memory (the plan's estimate), more than " in line
    assert "lower calibration.nsamples=1000000000 to at most " in line
    monkeypatch.setenv("COMPRESS_MAX_MEMORY_GB", "0.01")
    line = plan_error(capsys)
    assert "more than $COMPRESS_MAX_MEMORY_GB=0.01 (10.2 MB); lower calibration.nsamples=128 to at most 25 " in line
    monkeypatch.setenv("COMPRESS_MAX_MEMORY_GB", "1000000")  # set, it is the limit: also above MemTotal (a VM that grows)
    assert main(["plan", "recipes/wanda-50.yaml", "--set", "calibration.nsamples=1000000000"]) == 0
    monkeypatch.setenv("COMPRESS_MAX_MEMORY_GB", "lots")
    assert plan_error(capsys) == "error: $COMPRESS_MAX_MEMORY_GB='lots': expected a positive number of GB"


def test_a_plan_larger_than_the_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(checks, "device_memory_limit", lambda device: (2**30, "the memory of a test GPU"))
    recipe = validate_recipe({"stages": [{"method": "gptq", "bits": 4}]})
    stage = StagePlan(0, "gptq", {}, peak_host_bytes=1, peak_device_bytes=2 * 2**30, activation_bytes=2**30 + 2**29)
    with pytest.raises(CompressError, match="^stage 0 \\(gptq\\) needs ~2.0 GB of GPU memory .*more than the memory of a test GPU "
                                            "\\(1.0 GB\\); lower calibration.nsamples=128 to at most 42 "):
        checks.check_memory(recipe, [stage], torch.device("cuda"), torch.bfloat16)
    stage.activation_bytes = 0
    with pytest.raises(CompressError, match="the model itself does not fit: use a machine with more memory, or model.device=cpu$"):
        checks.check_memory(recipe, [stage], torch.device("cuda"), torch.bfloat16)


def test_shipped_recipes_plan_on_the_embedded_model(tiny_mixtral):
    """Every shipped recipe plans on the embedded model, but those for MoE experts (QMoE): the dense
    model is refused with one clear error before anything runs, and an MoE model plans."""
    for path in sorted(Path("recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        if any(stage.method == "qmoe" for stage in recipe.stages):
            with pytest.raises(CompressError, match="qmoe compresses MoE experts, and none of the 28 selected targets is one"):
                build_plan(recipe)
            recipe = load_recipe(path, [f"model.source={tiny_mixtral}"])
        assert build_plan(recipe).stages


# --- 5, 6. recipes too large to parse, and bad --set values -------------------------------------


def test_an_oversized_recipe_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\nstages: [{method: wanda}]\n")
    started = time.perf_counter()
    with pytest.raises(CompressError, match="big.yaml: 2,097,181 bytes, more than a recipe's 1,048,576$"):
        load_recipe(big)
    assert time.perf_counter() - started < 0.5
    with pytest.raises(CompressError, match="longer than 10,000 characters$"):
        load_recipe("recipes/wanda-50.yaml", ["name=" + "x" * 20_000])


def test_an_alias_bomb_and_deep_nesting_are_refused_at_once(tmp_path):
    lines = ["a0: &a0 {" + ", ".join(f"k{j}: v" for j in range(10)) + "}"]
    lines += [f"a{i}: &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * 10) + "]}" for i in range(1, 7)]  # 10**7 keys merged
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nstages: [{method: wanda}]\n")
    started = time.perf_counter()
    with pytest.raises(CompressError, match="bomb.yaml: not valid YAML at line 2 \\(aliases \\(\\*name\\) are not allowed in a recipe\\)$"):
        load_recipe(bomb)
    deep = tmp_path / "deep.yaml"
    deep.write_text("stages: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(CompressError, match="deep.yaml: not valid YAML at line 1 \\(nested deeper than 32 levels\\)$"):
        load_recipe(deep)
    assert time.perf_counter() - started < 1.0


def test_a_bad_set_value_is_one_line(capsys):
    code = main(["plan", "recipes/wanda-50.yaml", "--set", "stages.0.sparsity=[0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --set 'stages.0.sparsity=[0.5': not valid YAML (expected ',' or ']', but got '<stream end>')"]
    code = main(["validate", "recipes/wanda-50.yaml", "--set", "name=2024-13-01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --set 'name=2024-13-01': not valid YAML (month must be in 1..12)"]
