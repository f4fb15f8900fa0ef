"""The command line.

    compress validate RECIPE [--model M] [--set key=value ...]   check a recipe, print it resolved
    compress plan RECIPE [--json]                                every target of every stage, left-outs, estimates
    compress run RECIPE [--out DIR] [--no-track] [--nproc N]     run it here (the Prefect flow, tracked), in N processes
    compress serve [--limit N]                                   serve the flow for submissions
    compress workers --gpus 0,1 | --count N                      one worker per GPU on a Prefect work pool
    compress submit RECIPE [--wait]                              send a recipe to the served flow
    compress runs | compress compare ID ID [--figure [P]] [--log] read runs back from MLflow (a figure when asked)
    compress ui [--port P]                                       the MLflow UI on 127.0.0.1
    compress audit OUT                                           check an output against its report
    compress cache clear                                         drop stored steps

Input errors print one line (`error: ...`) and exit with code 2; a failed run exits with 1."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from compress.errors import EXIT_INPUT_ERROR, EXIT_RUN_FAILED, CompressError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description="Compress a Hugging Face model with a recipe.")
    commands = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("recipe", help="recipe YAML file")
        sub.add_argument("--model", help="model folder or hub id (overrides model.source)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                         help="override a recipe value, e.g. stages.0.sparsity=0.7 (repeatable)")
        return sub

    recipe_command("validate", "check a recipe and print it resolved, with defaults")
    plan = recipe_command("plan", "resolve every stage against the model (no weights loaded, no calibration)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    run = recipe_command("run", "run a recipe here: the Prefect flow in-process, tracked in MLflow")
    run.add_argument("--out", help="output folder (default: the recipe's output.dir, else runs/<recipe>-<model>-<hash>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an earlier output of another recipe or model (never a folder compress did not write)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--no-track", action="store_true", help="plain run: no Prefect, no MLflow (same steps, same output)")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="calibrate in N processes on this machine, each on its share of the batches (CPU, or one GPU each)")
    submit = recipe_command("submit", "send a recipe to the served flow (`compress serve`); prints the run ids")
    submit.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 if it failed")
    serve = commands.add_parser("serve", help="serve the flow as a Prefect deployment that accepts submissions")
    serve.add_argument("--limit", type=int, default=4, help="flow runs at once (default 4)")
    workers = commands.add_parser("workers", help="one worker per GPU on a Prefect work pool, each taking one submission at a time")
    chosen = workers.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--gpus", help="GPU indices, e.g. 0,1,2,3: one worker each, pinned with CUDA_VISIBLE_DEVICES")
    chosen.add_argument("--count", type=int, help="N workers without a GPU (CUDA_VISIBLE_DEVICES empty)")
    workers.add_argument("--pool", default="compress", help="the work pool (default compress; created if missing)")
    runs = commands.add_parser("runs", help="the latest runs, from MLflow")
    runs.add_argument("--limit", type=int, default=20)
    compare = commands.add_parser("compare", help="two or more runs side by side (ids or id prefixes)")
    compare.add_argument("run_ids", nargs="+", metavar="ID")
    compare.add_argument("--figure", nargs="?", const="", metavar="PATH",
                         help="also draw one figure (headline metrics side by side, per-layer error by block) to PATH "
                              "(default: compare-<ids>.png in the current folder)")
    compare.add_argument("--log", action="store_true", help="log the figure to MLflow, on each compared run as compare/<ids>.png")
    ui = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    audit = commands.add_parser("audit", help="check a finished output against its report; exit 1 listing what differs")
    audit.add_argument("out", help="the output folder (holds report.json)")
    cache = commands.add_parser("cache", help="the stored steps under $COMPRESS_HOME/steps")
    cache.add_argument("action", choices=["clear", "path"])
    return parser


def _load(args: argparse.Namespace) -> Any:
    from compress.recipe import load_recipe

    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.source={json.dumps(args.model)}")
    return load_recipe(args.recipe, overrides)


def _run(args: argparse.Namespace) -> int:
    recipe = _load(args)
    if args.command == "validate":
        print(json.dumps(recipe.describe(), indent=2))
        return 0
    from compress.run_command import run_command

    return run_command(args, recipe)


def _plan(args: argparse.Namespace) -> int:
    from compress.pipeline.plan import build_plan, format_plan

    plan = build_plan(_load(args))
    print(json.dumps(plan.describe(), indent=1) if args.json else format_plan(plan))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from compress.pipeline.audit import audit_output

    result = audit_output(args.out)
    if result["ok"]:
        print(f"ok: {result['checked']} targets are what the report says; bits/param {result['bits_per_param']:.4f}")
        return 0
    wrong = [name for name in result["problems"] if name != "(output)"]
    print(f"{len(wrong)} of {result['checked']} targets are not what the report says:")
    for name, found in result["problems"].items():
        for problem in found:
            print(f"  {name}: {problem}")
    return EXIT_RUN_FAILED


def _serve(args: argparse.Namespace) -> int:
    from compress.service.prefect import start_service, stop_server

    server = start_service("serving compress-recipe/compress")  # before prefect is imported: it reads PREFECT_API_URL then
    try:
        from flows.compress_flow import DEPLOYMENT_NAME, compress_recipe

        compress_recipe.serve(name=DEPLOYMENT_NAME, limit=args.limit, print_starting_message=False)
    finally:
        stop_server(server)
    return 0


def _workers(args: argparse.Namespace) -> int:
    from compress.service.workers import run_workers, worker_devices

    return run_workers(worker_devices(args.gpus, args.count), args.pool)


def _submit(args: argparse.Namespace) -> int:
    from compress.service.prefect import submit

    recipe = _load(args)
    result = submit(recipe.to_data(), args.wait)  # the worker decides where it writes and tracks (docs/security.md)
    print(f"flow run   {result['flow_run_id']}")
    missing = "(none)" if result["error"] else "(not found in this MLFLOW_TRACKING_URI: the worker tracks in its own)" if args.wait \
        else "(not started yet)"
    print(f"mlflow run {result['mlflow_run_id'] or missing}")
    if args.wait:
        print(f"state      {result['state']}")
    if result["error"]:  # refused by the worker, or failed
        print(f"error: {result['error']}", file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0 if not args.wait or result["state"] == "COMPLETED" else EXIT_RUN_FAILED


_TABLE_METRICS = ("perplexity", "dense_perplexity", "embedding_cosine", "sparsity", "bits_per_param", "size_bytes", "seconds")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}" if abs(value) < 1e5 else f"{value:.0f}"
    return "" if value is None else str(value)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _runs(args: argparse.Namespace) -> int:
    from compress.service.prefect import list_runs

    runs = list_runs(args.limit)
    if not runs:
        print("no runs yet")
        return 0
    metrics = [m for m in _TABLE_METRICS if any(m in r["metrics"] for r in runs)]
    header = ["run", "recipe", "status", *metrics, "model"]
    rows = [[r["run_id"][:12], r["recipe"], r["status"], *(_format(r["metrics"].get(m)) for m in metrics), r["model_version"]]
            for r in runs]
    print(_table([header, *rows]))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from compress.service.prefect import get_run
    from compress.service.tracking import RUN_METRICS

    runs = [get_run(run_id) for run_id in args.run_ids]
    rows = [["", *(r["run_id"][:12] for r in runs)], ["recipe", *(r["recipe"] for r in runs)]]
    rows += [[m, *(_format(r["metrics"].get(m)) for r in runs)] for m in RUN_METRICS if any(m in r["metrics"] for r in runs)]
    params = sorted({key for r in runs for key in r["params"]})
    differing = [key for key in params if len({r["params"].get(key) for r in runs}) > 1]
    rows += [[key, *(r["params"].get(key, "") for r in runs)] for key in differing]
    print(_table(rows))
    if args.figure is not None or args.log:
        _compare_figure(runs, args.figure, args.log)
    return 0


def _compare_figure(runs: list[dict[str, Any]], figure: str | None, log_it: bool) -> None:
    """Draw the comparison figure; write it where asked and/or log it on each run."""
    import tempfile
    from pathlib import Path

    from compress.service.figures import compare_figure, run_target_table
    from compress.service.tracking import client

    mlflow_client = client()
    ids = "-".join(r["run_id"][:8] for r in runs)
    rows = [{"label": f"{mlflow_client.get_run(r['run_id']).info.run_name} ({r['run_id'][:8]})", "metrics": r["metrics"],
             "targets": run_target_table(mlflow_client, r["run_id"])} for r in runs]
    with tempfile.TemporaryDirectory() as scratch:
        path = compare_figure(rows, Path(figure) if figure else Path(scratch if figure is None else ".") / f"compare-{ids}.png")
        if log_it:
            for r in runs:
                mlflow_client.log_artifact(r["run_id"], str(path), "compare")
            print(f"figure logged on each run as compare/{path.name}", file=sys.stderr)
        if figure is not None:
            print(f"figure: {path}", file=sys.stderr)


def _ui(args: argparse.Namespace) -> int:
    from compress.service.mlflow_view import runs_page
    from compress.service.tracking import client, ensure_experiment, tracking_uri

    uri = tracking_uri()
    command = ui_command(uri, args.port)
    experiment = ensure_experiment(client(uri))  # open on the runs table, not MLflow's empty start page
    print(f"MLflow UI for {uri}: the runs, headline columns shown, at {runs_page(f'http://127.0.0.1:{args.port}', experiment)}",
          file=sys.stderr)
    from compress.stopping import run_server

    return run_server(command)


def ui_command(uri: str, port: int) -> list[str]:
    """The MLflow UI server `compress ui` runs (on 127.0.0.1) for the tracking store `uri`."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]


def _cache(args: argparse.Namespace) -> int:
    from compress.pipeline.store import StepStore

    store = StepStore.default()
    if args.action == "path":
        print(store.root)
    else:
        print(f"removed {store.clear()} stored steps from {store.root}")
    return 0


_COMMANDS = {"validate": _run, "plan": _plan, "run": _run, "serve": _serve, "workers": _workers, "submit": _submit, "runs": _runs,
             "compare": _compare, "ui": _ui, "cache": _cache, "audit": _audit}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "quiet", False):
        from compress.progress import set_quiet

        set_quiet(True)
    # Our own progress lines at INFO; the libraries' (HTTP requests, MLflow's store) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("compress").setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    from compress.service.prefect import configure_prefect_home

    configure_prefect_home()
    if args.command in ("run", "serve", "workers", "ui"):
        from compress.leftovers import claim_children

        claim_children()  # processes this command starts are stopped by the next one if this one is killed
    try:
        return _COMMANDS[args.command](args)
    except CompressError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
