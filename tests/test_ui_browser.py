"""The MLflow UI as a person sees it, in a real (headless) Chromium: after two `compress run`s the
experiment's runs page, opened the way `compress ui` opens it, lists both runs with the perplexity,
bits/param and sparsity columns, without a click. Chromium comes from the distribution's packages
(`apt-get install chromium`), driven by Playwright pointed at that executable (no browser download).

The screenshot goes to the test's tmp folder; with COMPRESS_UI_SCREENSHOT=PATH also to PATH
(docs/mlflow-runs.png is made that way)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import fast_recipe

CHROMIUM = next((path for path in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                                   "/usr/bin/chromium") if path and Path(path).is_file()), None)
if CHROMIUM is None:
    pytest.skip("no Chromium found (apt-get install chromium, or set $CHROMIUM): the MLflow UI browser test is skipped",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

RECIPES = {"ui-magnitude-50": {"method": "magnitude", "sparsity": 0.5}, "ui-rtn-4bit": {"method": "rtn", "bits": 4}}
HEADLINE = ("perplexity", "bits_per_param", "sparsity")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_runs_page_shows_both_runs_with_headline_columns(tmp_path, monkeypatch):
    from compress.cli import main, ui_command
    from compress.service.mlflow_view import runs_page
    from compress.service.tracking import client, ensure_experiment, tracking_uri

    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("COMPRESS_EXPERIMENT", raising=False)
    small = {"evaluate": {"max_windows": 4}, "calibration": {"nsamples": 8}}
    for name, stage in RECIPES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(fast_recipe(stage, name=name, **small)))
        assert main(["run", str(path), "--out", str(tmp_path / name), "--quiet"]) == 0

    uri = tracking_uri()
    experiment = ensure_experiment(client(uri))
    port = _free_port()
    log = tmp_path / "mlflow-ui.log"
    with open(log, "wb") as handle:  # the command `compress ui` runs, in its own process group
        server = subprocess.Popen(ui_command(uri, port), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        shot = _screenshot_runs_page(runs_page(f"http://127.0.0.1:{port}", experiment), tmp_path / "mlflow-runs.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert shot["names"] == sorted(f"{name} · embedded" for name in RECIPES)
    for column in HEADLINE:
        assert column in shot["headers"], shot["headers"]
    for run in client(uri).search_runs([experiment], filter_string="tags.`compress.recipe` != ''"):  # the numbers, not only headers
        if "mlflow.parentRunId" not in run.data.tags:
            assert f"{run.data.metrics['perplexity']:g}" in shot["cells"], (run.info.run_name, shot["cells"])
    target = os.environ.get("COMPRESS_UI_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "mlflow-runs.png", target)


def _screenshot_runs_page(url: str, path: Path) -> dict:
    """Open `url` in headless Chromium, wait for the runs table, screenshot it; returns the parent
    runs' names, the visible column headers and the cells' text."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 640})
            page.goto(url)
            for name in RECIPES:
                page.get_by_text(f"{name} · embedded", exact=True).first.wait_for(state="visible", timeout=45_000)
            page.wait_for_timeout(500)  # the last cells render
            headers = [h.strip() for h in page.locator('[role="columnheader"]').all_inner_texts() if h.strip()]
            visible = [h for h in headers if page.get_by_role("columnheader", name=h).first.is_visible()]
            cells = [c.strip() for c in page.locator('[role="gridcell"]').all_inner_texts()]
            names = sorted(t for t in (n.strip() for n in page.locator('[role="row"] a').all_inner_texts()) if t.endswith("· embedded"))
            page.screenshot(path=str(path))
        finally:
            browser.close()
    return {"names": names, "headers": visible, "cells": cells}
