"""The public Python API: a model in memory gives the report the command line gives; the docstring
examples run as written."""

from __future__ import annotations

import doctest
import json

import yaml
from conftest import fast_recipe

import compress
from compress.cli import main


def test_apply_in_memory_equals_the_command_line(tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = fast_recipe({"method": "wanda", "sparsity": 0.5}, name="api-vs-cli")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--no-track", "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(compress.embedded_model())
    report = compress.apply(model, recipe)
    for key in ("perplexity", "dense_perplexity", "kl_to_dense", "top1_agreement", "sparsity", "bits_per_param", "layer_error_max"):
        assert report["metrics"][key] == cli["metrics"][key], key
    weight = model.model.layers[1].self_attn.q_proj.weight
    assert abs(float((weight == 0).float().mean()) - 0.5) < 1e-6  # compressed in place


def test_docstring_examples_run():
    import compress.api

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(compress.api) if t.examples]
    assert {t.name.rsplit(".", 1)[-1] for t in tests} >= {"apply", "run", "load", "embedded_model"}
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
