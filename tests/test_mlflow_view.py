"""Comparing runs in the MLflow UI works out of the box: two `compress run`s (in-process, the
embedded model, fast settings) on a fresh store, read back through MLflow's own client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import fast_recipe


def test_metrics_are_rounded_to_what_they_mean():
    from compress.service.mlflow_view import rounded

    assert rounded("perplexity", 100.48490573124889) == 100.48
    assert rounded("kl_to_dense", 0.17906908675759978) == 0.1791
    assert rounded("bits_per_param", 4.1234567) == 4.123
    assert rounded("sparsity", 0.500012345) == 0.5
    assert rounded("seconds", 7.2176916) == 7.2
    assert rounded("size_bytes", 4222505.0) == 4222505.0
    assert rounded("unknown", 0.123456789) == 0.123456789


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A fresh $COMPRESS_HOME whose `compress` experiment exists already (made by an older version,
    no kind tag), then two tracked runs: Wanda 50% and Wanda 2:4."""
    from mlflow.tracking import MlflowClient

    from compress.cli import main

    root = tmp_path_factory.mktemp("mlflow-view")
    patch = pytest.MonkeyPatch()
    patch.setenv("COMPRESS_HOME", str(root / "home"))
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (root / "home").mkdir()
    client = MlflowClient(f"sqlite:///{root / 'home' / 'mlflow.db'}")
    client.create_experiment("compress", artifact_location=(root / "home" / "mlartifacts").as_uri())
    recipes = {"view-50": {"method": "wanda", "sparsity": 0.5}, "view-2of4": {"method": "wanda", "pattern": "2:4"}}
    try:
        for name, stage in recipes.items():
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(fast_recipe(stage, name=name)))
            assert main(["run", str(path), "--out", str(root / name), "--quiet"]) == 0
    finally:
        patch.undo()
    experiment = client.get_experiment_by_name("compress")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, experiment, parents, runs, root


def test_the_experiment_opens_on_the_runs_table(two_runs):
    _, experiment, _, _, _ = two_runs
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_parent_runs_are_named_tagged_and_few_metrics(two_runs):
    client, _, parents, _, root = two_runs
    assert sorted(r.info.run_name for r in parents) == ["view-2of4 · embedded", "view-50 · embedded"]
    for run in parents:
        tags = run.data.tags
        assert tags["compress.model"] == "embedded" and tags["compress.methods"] == "wanda" and tags["compress.bits"] == "16"
        assert tags["compress.sparsity_pattern"] == ("2:4" if "2of4" in run.info.run_name else "unstructured")
        metrics = run.data.metrics
        assert len(metrics) <= 20, sorted(metrics)
        assert {"perplexity", "dense_perplexity", "kl_to_dense", "sparsity", "bits_per_param", "size_bytes", "seconds"} <= set(metrics)
        assert not any(key.startswith(("layer_error.", "target_seconds.")) for key in metrics)
        assert metrics["seconds"] == round(metrics["seconds"], 1) and metrics["bits_per_param"] == round(metrics["bits_per_param"], 3)


def test_parent_runs_carry_the_target_table_and_report_md(two_runs):
    client, _, parents, _, root = two_runs
    for run in parents:
        report = json.loads((root / run.data.tags["compress.recipe"] / "report.json").read_text())
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"report.md", "targets.json", "report.json"} <= artifacts
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "targets.json", str(root))).read_text())
        targets = [row[table["columns"].index("target")] for row in table["data"]]
        assert targets == list(report["targets"])  # one row per target, in block order
        markdown = Path(client.download_artifacts(run.info.run_id, "report.md", str(root))).read_text()
        assert markdown.startswith(f"# {run.data.tags['compress.recipe']} · ") and "perplexity" in markdown


def test_child_runs_are_numbered_steps_without_the_headline(two_runs):
    client, _, parents, runs, _ = two_runs
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        children.sort(key=lambda r: r.info.start_time, reverse=True)  # as the UI lists them: newest first
        assert [c.info.run_name for c in children] == ["1 load", "2 calibrate", "3 stage 0 (wanda)", "4 evaluate", "5 export", "6 audit"]
        assert all(c.info.end_time >= c.info.start_time for c in children)
        for child in children:
            assert not {"perplexity", "dense_perplexity", "sparsity", "bits_per_param", "size_bytes"} & set(child.data.metrics)
            assert not any("." in key for key in child.data.metrics)
        stage = children[2]
        assert {"stage_sparsity", "stage_error_max", "cached"} <= set(stage.data.metrics)
        assert "targets.json" in {a.path for a in client.list_artifacts(stage.info.run_id)}


def test_registered_versions_describe_the_model(two_runs):
    client, _, parents, _, _ = two_runs
    for run in parents:
        (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        assert "<embedded model>" in version.description and "perplexity" in version.description
        assert version.tags["compress.base_model"] == "<embedded model>"
        assert float(version.tags["perplexity"]) == run.data.metrics["perplexity"]


def test_dataset_inputs_and_logged_models_fill_the_runs_table(two_runs):
    client, experiment, parents, _, _ = two_runs
    for run in (client.get_run(r.info.run_id) for r in parents):
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"calibration", "evaluation"}
        assert inputs["calibration"].name == "train.txt" and inputs["evaluation"].name == "eval.txt"
        assert len(inputs["evaluation"].digest) == 8 and json.loads(inputs["evaluation"].profile)["windows"] > 0
        (output,) = run.outputs.model_outputs
        logged = client.get_logged_model(output.model_id)
        assert logged.source_run_id == run.info.run_id and logged.name == f"{run.data.tags['compress.recipe']}-embedded"
        assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    view = json.loads(experiment.tags["mlflow.sharedViewState.compress-headline"])
    assert {"metrics.`perplexity`", "metrics.`bits_per_param`", "metrics.`sparsity`"} <= set(view["selectedColumns"])


def test_compare_writes_one_figure(two_runs, tmp_path, monkeypatch, capsys):
    from compress.cli import main

    client, _, parents, _, root = two_runs
    monkeypatch.setenv("COMPRESS_HOME", str(root / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    figure = tmp_path / "both.png"
    assert main(["compare", *(r.info.run_id for r in parents), "--figure", str(figure), "--log"]) == 0
    assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 20_000
    assert f"figure: {figure}" in capsys.readouterr().err
    for run in parents:
        assert "compare/both.png" in {a.path for a in client.list_artifacts(run.info.run_id, "compare")}
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *(r.info.run_id[:8] for r in parents), "--figure"]) == 0
    assert (tmp_path / f"compare-{'-'.join(r.info.run_id[:8] for r in parents)}.png").is_file()
