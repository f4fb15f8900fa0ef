import pytest
from conftest import fast_recipe

from compress.errors import CompressError
from compress.recipe import apply_override, load_recipe, parse_yaml, validate_recipe


def test_yaml_keeps_nm_pattern_a_string():
    # YAML 1.1 would read 2:4 as the base-60 integer 124.
    assert parse_yaml("pattern: 2:4") == {"pattern": "2:4"}


def test_shipped_recipes_validate():
    for name in ("wanda-50", "wanda-2of4", "magnitude-50"):
        recipe = load_recipe(f"recipes/{name}.yaml")
        assert recipe.stages[0].params.sparsity == 0.5


def test_nm_pattern_implies_sparsity():
    recipe = validate_recipe(fast_recipe({"method": "wanda", "pattern": "4:8"}))
    assert recipe.stages[0].params.sparsity == 0.5
    recipe = validate_recipe(fast_recipe({"method": "wanda", "pattern": "1:4"}))
    assert recipe.stages[0].params.sparsity == 0.75


def test_overrides_go_through_validation():
    recipe = load_recipe("recipes/wanda-50.yaml", ["stages.0.sparsity=0.7"])
    assert recipe.stages[0].params.sparsity == 0.7
    recipe = load_recipe("recipes/wanda-50.yaml", ["stages.0.pattern=2:4"])
    assert recipe.stages[0].params.pattern == "2:4"
    with pytest.raises(CompressError, match="stages.0 \\(wanda\\): sparsity must be a fraction in \\(0, 1\\)"):
        load_recipe("recipes/wanda-50.yaml", ["stages.0.sparsity=1.5"])
    with pytest.raises(CompressError, match="needs an index"):
        load_recipe("recipes/wanda-50.yaml", ["stages.3.sparsity=0.5"])


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"method": "wandaa"}, "unknown method 'wandaa' .* did you mean 'wanda'"),
        ({"method": "wanda", "sparsty": 0.5}, "unknown key 'sparsty' .*allowed: targets, sparsity, pattern.*did you mean 'sparsity'"),
        ({"method": "wanda", "sparsity": 0.0}, "sparsity must be a fraction in \\(0, 1\\), got 0"),
        ({"method": "wanda", "sparsity": 1}, "sparsity must be a fraction in \\(0, 1\\), got 1"),
        ({"method": "wanda", "pattern": "4:4"}, "N:M needs 0 < N < M"),
        ({"method": "wanda", "pattern": "5:4"}, "N:M needs 0 < N < M"),
        ({"method": "wanda", "pattern": "2:4", "sparsity": 0.7}, "fixes sparsity at 0.5"),
        ({"method": "magnitude", "pattern": "half"}, "pattern must be 'unstructured' or 'N:M'"),
        ({"method": "wanda", "targets": {"inclde": ["*"]}}, "unknown key 'inclde'.*did you mean 'include'"),
    ],
)
def test_bad_stage_is_one_clear_line(stage, message):
    with pytest.raises(CompressError, match=message) as caught:
        validate_recipe(fast_recipe(stage))
    assert "\n" not in str(caught.value)


def test_unknown_top_level_key_lists_allowed():
    data = fast_recipe({"method": "wanda"})
    data["calibraton"] = {}
    with pytest.raises(CompressError, match="unknown key 'calibraton'.*did you mean 'calibration'"):
        validate_recipe(data)


def test_override_creates_missing_sections():
    data = {"stages": [{"method": "wanda"}]}
    apply_override(data, "calibration.nsamples=4")
    assert validate_recipe(data).calibration.nsamples == 4
