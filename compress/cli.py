"""`compress validate RECIPE` and `compress run RECIPE [--model M] [--out DIR] [--set key=value ...]`.

Input errors print one line (`error: ...`) and exit with code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from compress.errors import CompressError

EXIT_INPUT_ERROR = 2


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
    run = recipe_command("run", "run a recipe: compress, evaluate, write checkpoint and report.json")
    run.add_argument("--out", help="output folder (default: the recipe's output.dir, else runs/<recipe name>)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _load(args: argparse.Namespace) -> Any:
    from compress.recipe import load_recipe

    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.source={json.dumps(args.model)}")
    return load_recipe(args.recipe, overrides)


def _summary(report: dict[str, Any], out: str) -> str:
    metrics = report["metrics"]
    lines = [f"wrote {out}"]
    for key in ("perplexity", "dense_perplexity", "embedding_cosine", "sparsity", "bits_per_param", "size_bytes", "seconds"):
        if key in metrics:
            value = metrics[key]
            lines.append(f"  {key:<18} {value:.4f}" if isinstance(value, float) else f"  {key:<18} {value}")
    for stage in report["stages"]:
        lines.append(f"  stage {stage['method']:<12} {stage['targets']} targets, {stage['seconds']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when a bar is created
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        recipe = _load(args)
        if args.command == "validate":
            print(json.dumps(recipe.describe(), indent=2))
            return 0
        from compress.pipeline import resolve_output_dir, run

        out = resolve_output_dir(recipe, args.out)
        report = run(recipe, out)
        print(_summary(report, str(out)))
        return 0
    except CompressError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
