"""The output folder: named by recipe and model, replaced only when compress wrote it, never over a
user's files, never over the run's own inputs."""

from __future__ import annotations

import json
import shutil

import pytest

from compress.cli import main
from compress.pipeline.output import MARKER_FILE

FAST = ["--no-track", "--set", "evaluate.layer_error=false", "--set", "evaluate.max_windows=4", "--set", "evaluate.kl_top_k=0",
        "--set", "output.onnx=false"]


def _run(capsys, *args):
    code = main(["run", *args, *FAST])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def second_model(tmp_path):
    """The embedded model copied elsewhere under another name: a second model for the same recipe."""
    from compress.model.load import embedded_model_path

    path = tmp_path / "models" / "other-llama"
    shutil.copytree(embedded_model_path(), path)
    return path


def test_two_models_through_one_recipe_leave_two_outputs(tmp_path, capsys, monkeypatch, second_model):
    monkeypatch.chdir(tmp_path)
    assert _run(capsys, f"{_recipes()}/magnitude-50.yaml")[0] == 0
    assert _run(capsys, f"{_recipes()}/magnitude-50.yaml", "--model", str(second_model))[0] == 0
    outputs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(outputs) == 2 and outputs[0].startswith("magnitude-50-embedded-") and outputs[1].startswith("magnitude-50-other-llama-")
    # the same recipe and model again: the same folder, found done (its steps are stored)
    assert _run(capsys, f"{_recipes()}/magnitude-50.yaml")[0] == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == outputs


def test_a_report_beside_a_users_files_is_not_ours(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in {"report.json": "{}", "thesis.tex": "chapter 1", "notes.txt": "keep"}.items():
        (out / name).write_text(text)
    for extra in ([], ["--overwrite"]):
        code, err = _run(capsys, f"{_recipes()}/magnitude-50.yaml", "--out", str(out), *extra)
        assert code == 2 and len(err) == 1 and "not written by compress" in err[0]
    assert (out / "thesis.tex").read_text() == "chapter 1" and (out / "notes.txt").read_text() == "keep"


def test_files_added_to_an_output_are_never_deleted(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, f"{_recipes()}/magnitude-50.yaml", "--out", str(out))[0] == 0
    assert json.loads((out / MARKER_FILE).read_text())["files"]  # every file it wrote, listed
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, err = _run(capsys, f"{_recipes()}/magnitude-50.yaml", "--out", str(out), *extra)
        assert code == 2 and "did not write (notes.txt)" in err[0]
    assert (out / "notes.txt").read_text() == "mine"


def test_another_recipe_replaces_an_output_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, f"{_recipes()}/magnitude-50.yaml", "--out", str(out))[0] == 0
    code, err = _run(capsys, f"{_recipes()}/rtn-4bit.yaml", "--out", str(out))
    assert code == 2 and "--overwrite" in err[0] and "magnitude-50" in err[0]
    assert json.loads((out / "report.json").read_text())["stages"][0]["method"] == "magnitude"
    assert _run(capsys, f"{_recipes()}/rtn-4bit.yaml", "--out", str(out), "--overwrite")[0] == 0
    assert json.loads((out / "report.json").read_text())["stages"][0]["method"] == "rtn"


def test_inputs_inside_the_output_are_refused(tmp_path, capsys, second_model):
    out = second_model.parent
    code, err = _run(capsys, f"{_recipes()}/magnitude-50.yaml", "--model", str(second_model), "--out", str(out))
    assert code == 2 and len(err) == 1 and "inside the output folder" in err[0]
    assert (second_model / "config.json").is_file()
    text = tmp_path / "out2" / "cal.txt"
    text.parent.mkdir()
    text.write_text("To be, or not to be. " * 200)
    code, err = _run(capsys, f"{_recipes()}/magnitude-50.yaml", "--out", str(text.parent), "--set", f"evaluate.text={text}")
    assert code == 2 and "evaluate.text" in err[0] and text.is_file()


def _recipes() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent / "recipes")


def test_the_output_keeps_the_runs_log_even_when_the_terminal_is_quiet(tmp_path, capsys):
    out = tmp_path / "out"
    # a sparsity no other test uses: the stage runs (a stored step would log nothing of it)
    assert _run(capsys, f"{_recipes()}/magnitude-50.yaml", "--out", str(out), "--quiet", "--set", "stages.0.sparsity=0.37")[0] == 0
    lines = (out / "run.log").read_text().splitlines()
    assert any("stage 0 (magnitude)" in line and "targets" in line for line in lines), lines
    assert all(line[:4].isdigit() and " INFO " in line or " WARNING " in line for line in lines)  # timestamped, with the level
    assert "run.log" in json.loads((out / MARKER_FILE).read_text())["files"]
