from pathlib import Path

import pytest

from llmbin.errors import LlmbinError
from llmbin.recipes import read_recipe, recipe_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_the_published_settings_ship_as_recipes():
    names = {p.stem for p in RECIPES}
    assert {"pb-llm-10", "pb-llm-20", "pb-llm-30", "pb-llm-50", "billm", "arb-x", "arb-rc", "db-llm-fdb",
            "db-llm-fdb-distill", "rtn-sign", "gptq-w2", "gptq-w2g128", "gptq-w3", "gptq-w4g128"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_records_all_its_values(path):
    data = read_recipe(path)
    config = recipe_config(path)
    assert config.method == data["method"]
    recorded = config.to_dict()
    for key, value in data.items():
        assert recorded[key] == value, key


def test_overrides_win_over_recipe_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: pb-llm\nsalient_frac: 0.3\nsalient_metric: magnitude\n")
    config = recipe_config(recipe, salient_frac=0.05)
    assert config.salient_frac == 0.05 and config.salient_metric == "magnitude"
    assert recipe_config(recipe, "pb-llm").salient_frac == 0.3


@pytest.mark.parametrize("text,match", [
    ("method: pb-llm\nsalient_frac: [\n", "not valid YAML"),
    ("salient_frac: 0.1\n", "'method' key"),
    ("method: pb-llm\ngroup_size: 64\n", "unknown option"),
    ("method: pb-llm\nsalient_frac: 3\n", "salient-frac"),
    ("method: nope\n", "unknown method"),
])
def test_bad_recipes_get_clear_errors(tmp_path, text, match):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(LlmbinError, match=match):
        recipe_config(recipe)


def test_missing_recipe_and_contradicting_method_are_errors(tmp_path):
    with pytest.raises(LlmbinError, match="does not exist"):
        recipe_config(tmp_path / "none.yaml")
    with pytest.raises(LlmbinError, match="contradicts"):
        recipe_config(RECIPES[0], "rtn-sign" if read_recipe(RECIPES[0])["method"] != "rtn-sign" else "gptq")


@pytest.mark.parametrize("line,message", [
    ('salient_frac: "0.1"', "option salient_frac must be a number, got '0.1' (quoted in the recipe? write it without quotes)"),
    ('refit_scales: "false"', "option refit_scales must be true or false, got 'false' (quoted in the recipe? write it "
                              "without quotes)"),
    ("salient_bits: 2.5", "option salient_bits must be an integer, got 2.5"),
    ("blocksize: 64.0", "option blocksize must be an integer, got 64.0"),
    ("salient_metric: 3", "option salient_metric must be a string, got 3"),
    ("percdamp: yes", "option percdamp must be a number, got True"),
])
def test_a_recipe_value_of_the_wrong_type_is_refused_by_name(tmp_path, line, message):
    """A quoted "false" would otherwise switch the option on (a non-empty string is true) while
    config.json records "false"."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: pb-llm\n{line}\n")
    with pytest.raises(LlmbinError) as info:
        recipe_config(recipe)
    assert str(info.value) == message
