"""The service boundary as pure functions: what a served submission may name (compress/service/confine.py),
who owns a registered model, what a submission can no longer set, and where the servers listen.
The end-to-end submission through the served flow is in tests/test_workflow.py."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from compress.errors import CompressError
from compress.recipe import validate_recipe
from compress.service.confine import (
    Roots,
    confine,
    is_served,
    output_folder,
    registered_name,
    submitter_identity,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def roots(tmp_path):
    """Roots of a worker, a model folder and two texts inside them, and a secret outside them."""
    for name in ("models/tiny", "texts", "outputs", "outside/model"):
        (tmp_path / name).mkdir(parents=True)
    for folder in (tmp_path / "models/tiny", tmp_path / "outside/model"):
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "texts/train.txt").write_text("to be or not to be\n")
    (tmp_path / "texts/eval.txt").write_text("that is the question\n")
    (tmp_path / "outside/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    env = {"COMPRESS_MODEL_ROOTS": str(tmp_path / "models"), "COMPRESS_TEXT_ROOTS": str(tmp_path / "texts"),
           "COMPRESS_OUTPUT_ROOT": str(tmp_path / "outputs")}
    return Roots.from_env(env), tmp_path


def _recipe(**sections):
    return validate_recipe({"name": "wanda", "stages": [{"method": "wanda", "sparsity": 0.5}], **sections})


def _refused(recipe, roots, match, **kwargs):
    with pytest.raises(CompressError, match=match) as raised:
        confine(recipe, roots, **kwargs)
    assert "\n" not in str(raised.value)  # one line
    return str(raised.value)


def test_roots_default_under_compress_home_and_lists(tmp_path):
    home = tmp_path / "home"
    roots = Roots.from_env({"COMPRESS_HOME": str(home)})
    assert roots == Roots((home / "models",), (home / "texts",), home / "outputs")
    listed = Roots.from_env({"COMPRESS_HOME": str(home), "COMPRESS_MODEL_ROOTS": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b' / '..' / 'c'}"})
    assert listed.models == (tmp_path / "a", tmp_path / "c")  # resolved


def test_output_location_is_the_workers(roots):
    roots, base = roots
    _refused(_recipe(output={"dir": "/tmp/anywhere"}), roots, "output.dir")
    _refused(_recipe(output={"dir": "../x"}), roots, "output.dir")
    _refused(_recipe(output={"dir": str(base / "outputs" / "mine")}), roots, "output.dir")  # even inside the root
    _refused(_recipe(), roots, "output.dir", out=str(base / "elsewhere"))  # the flow's `out` parameter
    _refused(_recipe(), roots, "overwrite", overwrite=True)
    for name in ("../../etc", ".hidden", "a/b"):
        _refused(_recipe(name=name), roots, "name")
    folder = output_folder(confine(_recipe(), roots), roots, "0123456789abcdef")
    assert folder.parent == roots.output and folder.name == "wanda-embedded-01234567"


def test_texts_outside_the_text_roots_are_refused(roots):
    roots, base = roots
    message = _refused(_recipe(calibration={"text": [str(base / "outside/passwd")]}), roots, "calibration.text")
    assert "outside the worker's text roots" in message
    _refused(_recipe(calibration={"text": "/etc/passwd"}), roots, "calibration.text")
    _refused(_recipe(evaluate={"text": "/etc/passwd"}), roots, "evaluate.text")
    _refused(_recipe(calibration={"text": [str(base / "texts/../outside/passwd")]}), roots, "calibration.text")  # `..` escape
    _refused(_recipe(evaluate={"text": str(base / "models/tiny/config.json")}), roots, "evaluate.text")  # a model root is not a text root
    _refused(_recipe(calibration={"dataset": str(base / "outside")}), roots, "calibration.dataset")  # datasets reads local folders


def test_models_outside_the_model_roots_are_refused(roots):
    roots, base = roots
    _refused(_recipe(model=str(base / "outside/model")), roots, "model.source")
    _refused(_recipe(model=str(base / "models/../outside/model")), roots, "model.source")
    _refused(_recipe(model="/"), roots, "model.source")
    _refused(_recipe(model="~"), roots, "model.source")
    _refused(_recipe(model="org/name with spaces"), roots, "neither a hub id")


def test_symlinks_inside_a_root_pointing_outside_are_refused(roots):
    roots, base = roots
    (base / "texts/link.txt").symlink_to(base / "outside/passwd")
    _refused(_recipe(calibration={"text": [str(base / "texts/link.txt")]}), roots, "calibration.text")
    (base / "models/linked").symlink_to(base / "outside/model")  # the folder itself
    _refused(_recipe(model=str(base / "models/linked")), roots, "model.source")
    (base / "texts/loop.txt").symlink_to(base / "texts/loop.txt")
    _refused(_recipe(evaluate={"text": str(base / "texts/loop.txt")}), roots, "cannot be resolved")
    (base / "models/tiny/tokenizer.json").symlink_to(base / "outside/passwd")  # a file inside the model folder
    assert "tokenizer.json leads outside" in _refused(_recipe(model=str(base / "models/tiny")), roots, "model.source")


def test_paths_inside_the_roots_run_resolved(roots):
    roots, base = roots
    (base / "models/alias").symlink_to(base / "models/tiny")  # inside to inside: fine
    (base / "models/tiny/loop").symlink_to(base / "models/tiny")  # a loop is walked once
    recipe = _recipe(model=str(base / "models/alias"), calibration={"text": [str(base / "texts/../texts/train.txt")]},
                     evaluate={"text": str(base / "texts/eval.txt")})
    confined = confine(recipe, roots)
    assert confined.model.source == str(base / "models/tiny")
    assert confined.calibration.text == [str(base / "texts/train.txt")]
    assert confined.evaluate.text == str(base / "texts/eval.txt")
    assert confined.stages[0].describe() == recipe.stages[0].describe()
    for hub in ("gpt2", "org/some-model.v2"):
        assert confine(_recipe(model=hub), roots).model.source == hub  # hub ids are not paths
    assert confine(_recipe(), roots).model.source is None  # the embedded model


def test_served_means_a_deployment_or_the_workers_flag():
    assert is_served("2b1c", {}) and is_served(None, {"COMPRESS_SERVED": "1"})
    assert not is_served(None, {}) and not is_served("", {"COMPRESS_SERVED": "0"})


def test_submitter_identity_and_registered_names():
    assert submitter_identity("alice", {}) == "alice"
    assert submitter_identity(None, {}) == "anonymous"
    assert submitter_identity("mallory", {"COMPRESS_WORKER_SUBMITTER": "team-a"}) == "team-a"  # the worker decides
    for bad in ("../x", "a b", "-x"):
        with pytest.raises(CompressError, match="submitter"):
            submitter_identity(bad, {})
    assert registered_name("wanda-50-embedded") == "wanda-50-embedded"
    for bad in ("a/b", "x:y", "", " x"):
        with pytest.raises(CompressError, match="register_as"):
            registered_name(bad)


def test_a_registered_model_belongs_to_its_submitter(tmp_path):
    from mlflow.tracking import MlflowClient

    from compress.service.ownership import OWNER_TAG, check_owner

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("taken", tags={OWNER_TAG: "alice"})
    client.create_registered_model("untagged")
    check_owner(client, "taken", "alice")
    check_owner(client, "new-name", "mallory")  # nobody's yet
    with pytest.raises(CompressError, match="belongs to submitter 'alice'"):
        check_owner(client, "taken", "mallory")
    with pytest.raises(CompressError, match="registered outside the service"):
        check_owner(client, "untagged", "mallory")


def test_a_submission_cannot_name_the_tracking_store_or_run():
    from flows.compress_flow import compress_recipe

    parameters = set(inspect.signature(compress_recipe.fn).parameters)
    assert {"tracking_uri", "mlflow_run_id"}.isdisjoint(parameters)
    assert parameters == {"recipe", "out", "register_as", "overwrite", "submitter"}


def test_servers_compress_starts_listen_on_loopback(monkeypatch, tmp_path):
    import compress.service.prefect as service

    with pytest.raises(CompressError, match="loopback"):
        service.start_prefect_server("http://0.0.0.0:4200/api", tmp_path / "log")
    started = []

    class Process:
        def __init__(self, command, **kwargs):
            started.append(command)

        def poll(self):
            return None

    monkeypatch.setattr(service.subprocess, "Popen", Process)
    monkeypatch.setattr(service, "api_is_up", lambda url, timeout=2.0: True)
    service.start_prefect_server("http://127.0.0.1:4299/api", tmp_path / "log")
    assert started[0][started[0].index("--host") + 1] == "127.0.0.1"
    assert 'MLFLOW_HOST:-127.0.0.1' in (REPO / "mlflow/start-server.sh").read_text()
    saved = dict(os.environ)
    try:
        os.environ.pop("PREFECT_RUNNER_SERVER_HOST", None)
        service.configure_prefect_home()
        assert os.environ["PREFECT_RUNNER_SERVER_HOST"] == "127.0.0.1"  # the worker's webserver, where enabled
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_serve_warns_about_exposed_apis_without_credentials(tmp_path):
    from compress.service.prefect import serving_notes

    home = {"COMPRESS_HOME": str(tmp_path)}
    assert [n for n in serving_notes(home) if n.startswith("warning")] == []  # the loopback default
    exposed = {**home, "PREFECT_API_URL": "http://10.0.0.5:4200/api", "MLFLOW_TRACKING_URI": "http://mlflow.team:5000"}
    assert len([n for n in serving_notes(exposed) if n.startswith("warning")]) == 2
    guarded = {**exposed, "PREFECT_API_AUTH_STRING": "u:p", "MLFLOW_TRACKING_USERNAME": "worker"}
    assert [n for n in serving_notes(guarded) if n.startswith("warning")] == []


def test_a_refusal_reaches_the_submitter_as_one_line(monkeypatch):
    from compress.service.prefect import declared_submitter, failure_line

    message = "Flow run encountered an exception: CompressError: calibration.text /etc/passwd: outside the worker's text roots"
    assert failure_line(message) == "calibration.text /etc/passwd: outside the worker's text roots"
    assert failure_line(None) == "the flow run failed"
    monkeypatch.setenv("COMPRESS_SUBMITTER", "DOMAIN\\j doe")
    assert declared_submitter() == "DOMAIN-j-doe"
