"""End to end through `compress.pipeline.engine.run` and the CLI, on the embedded model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import exported_tensors, fast_recipe
from transformers import AutoModelForCausalLM

import compress
from compress.calibration.data import embedded_text, read_text_file, tokenize
from compress.cli import main
from compress.model.load import embedded_model_path
from compress.pipeline.engine import run
from compress.pipeline.metrics import eval_windows, perplexity
from compress.recipe import validate_recipe


@pytest.fixture(scope="module")
def wanda_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "wanda"
    report = run(validate_recipe(fast_recipe({"method": "wanda", "sparsity": 0.5})), out)
    return out, report


def test_report_has_stable_metric_names(wanda_run):
    out, report = wanda_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    metrics = report["metrics"]
    for key in ("perplexity", "dense_perplexity", "sparsity", "size_bytes", "bits_per_param", "params", "seconds"):
        assert key in metrics
    assert metrics["sparsity"] == pytest.approx(0.5)
    assert 9 < metrics["bits_per_param"] < 9.05  # a 1-bit mask and the kept half in bf16, per-tile offsets
    assert metrics["perplexity"] > metrics["dense_perplexity"]
    # fidelity to the dense model on the same windows: pruning half the weights moves the distribution
    assert 0 < metrics["kl_to_dense"] < 5 and 0.2 < metrics["top1_agreement"] < 1
    stage = report["stages"][0]
    assert stage["method"] == "wanda" and stage["params"]["sparsity"] == 0.5 and stage["seconds"] > 0
    assert all(abs(t["sparsity"] - 0.5) < 1e-9 for t in report["targets"].values())
    assert "lm_head" in report["left_out"]


def test_packed_export_reloads_with_the_evaluated_weights(wanda_run):
    """compress.load (kernel-backed modules) gives the perplexity the report claims, and the logits of
    the dense model with the exported zeros applied."""
    out, report = wanda_run
    reloaded = compress.load(out, dtype=torch.float32)
    assert {type(reloaded.get_submodule(name)).__name__ for name in report["targets"]} == {"BitmapLinear"}
    dense = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32).eval()
    exported = exported_tensors(out)
    with torch.no_grad():
        for name in report["targets"]:
            dense.get_submodule(name).weight.mul_(exported[f"{name}.weight"] != 0)
    ids = tokenize(dense_tokenizer(), read_text_file(embedded_text("eval.txt"), "eval"))
    windows = eval_windows(ids, 128, 16)
    with torch.no_grad():  # the kernels sum in another order than a dense matmul: equal to rounding
        assert torch.allclose(reloaded(input_ids=windows[:4]).logits, dense(input_ids=windows[:4]).logits, atol=1e-4, rtol=0)
    assert perplexity(reloaded, windows, torch.device("cpu")) == pytest.approx(report["metrics"]["perplexity"], rel=1e-5)
    assert exported_tensors(out)["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


def dense_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path())


def test_wanda_beats_magnitude_on_the_fixture_model(wanda_run, tmp_path):
    _, wanda = wanda_run
    magnitude = run(validate_recipe(fast_recipe({"method": "magnitude", "sparsity": 0.5}, evaluate={"dense": False})), tmp_path / "m")
    assert wanda["metrics"]["perplexity"] < magnitude["metrics"]["perplexity"]


def test_two_stages_keep_earlier_zeros(tmp_path):
    report = run(
        validate_recipe(fast_recipe({"method": "magnitude", "sparsity": 0.3}, {"method": "wanda", "pattern": "2:4"},
                                    evaluate={"dense": False})),
        tmp_path / "two",
    )
    exported = exported_tensors(tmp_path / "two")
    # groups where magnitude left fewer than 2 of 4: not exactly 2:4, so a bitmask (smaller here) stores them
    assert report["metrics"]["sparsity"] >= 0.5 and report["formats"] == {"bitmap": 28}
    for name, target in report["targets"].items():
        assert target["stages"] == ["magnitude", "wanda"]
        kept = exported[f"{name}.weight"] != 0
        assert (kept.view(kept.shape[0], -1, 4).sum(-1) <= 2).all()


def _cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["stages.0.method=wandaa"], "unknown method 'wandaa'"),
        (["stages.0.sparsty=0.5"], "unknown key 'sparsty'"),
        (["stages.0.sparsity=1.5"], "sparsity must be a fraction in (0, 1)"),
        (["stages.0.sparsity=0"], "sparsity must be a fraction in (0, 1)"),
        (["stages.0.pattern=4:4"], "N:M needs 0 < N < M"),
        (["stages.0.pattern=3:5", "stages.0.sparsity=0.4"], "is not divisible by M=5"),
        (["model.source=./no/such/model"], "model path not found: ./no/such/model"),
        (["stages.0.targets.include=[model.layers.*.mlp.nope]"], "matches no target"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(sets, message, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", "recipes/wanda-50.yaml", "--out", str(out)]
    for assignment in sets:
        args += ["--set", assignment]
    code, err = _cli(args, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "recipe, sets, message",
    [
        ("gptq-3bit", ["stages.0.bits=1"], "stages.0.bits (gptq): Input should be greater than or equal to 2"),
        # a group size that does not divide the input size now quantizes a last, shorter group (tests/test_partial_groups.py)
        ("gptq-3bit", ["stages.0.group_size=0"], "stages.0.group_size (gptq): Input should be greater than 0"),
        ("rtn-4bit", ["stages.0.bitz=3"], "unknown key 'bitz'"),
        ("spqr-3bit", ["stages.0.qq_groupsize=100"], "is not divisible by qq_groupsize=100"),
        ("spqr-3bit", ["stages.0.block_size=100"], "block_size 100 must be a multiple of group_size 16"),
        ("wanda-dsnot-70", ["stages.1.pattern=2:4"], "differs from the unstructured"),
    ],
)
def test_bad_method_parameters_one_line_exit_2(recipe, sets, message, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", f"recipes/{recipe}.yaml", "--out", str(out)]
    for assignment in sets:
        args += ["--set", assignment]
    code, err = _cli(args, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_empty_calibration_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "out"
    code, err = _cli(["run", "recipes/wanda-50.yaml", "--out", str(out), "--set", f"calibration.text={empty}"], capsys)
    assert code == 2 and err == [f"error: calibration file is empty: {empty}"]
    assert not out.exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    code, err = _cli(["run", "recipes/magnitude-50.yaml", "--out", str(tmp_path)], capsys)
    assert code == 2 and "not empty" in err[0]
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_the_first_command_runs_with_no_server_configured(tmp_path):
    """What a new user runs first (the README's `compress run recipes/wanda-50.yaml`), in a fresh process with
    no Prefect or MLflow server configured: Prefect's temporary server and a local sqlite store."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_"))}
    env["COMPRESS_HOME"] = str(tmp_path / "home")
    result = subprocess.run([sys.executable, "-m", "compress", "run", "recipes/wanda-50.yaml", "--out", str(tmp_path / "out"),
                             "--set", "calibration.nsamples=16", "--set", "calibration.seqlen=128", "--set", "evaluate.max_windows=8"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlflow run" in result.stdout and (tmp_path / "home" / "mlflow.db").is_file()
    assert (tmp_path / "out" / "report.json").is_file() and list((tmp_path / "out" / "packed").glob("*.safetensors"))


def test_cli_process_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "compress", "validate", "recipes/wanda-50.yaml", "--set", "stages.0.pattern=8:4"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: stages.0.pattern (wanda): '8:4': N:M needs 0 < N < M (keep N of every M weights)"
    ]
