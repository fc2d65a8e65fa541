from pathlib import Path

import pytest

from llmbin.errors import LlmbinError
from llmbin.recipes import find_recipe, read_recipe, recipe_config, shipped_recipes

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
    with pytest.raises(LlmbinError, match="is neither a file nor a shipped recipe"):
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


@pytest.mark.parametrize("line,value", [("percdamp: 1e-2", 0.01), ("percdamp: 5E-3", 0.005), ("percdamp: 1.0e-2", 0.01),
                                        ("percdamp: .5e-1", 0.05), ("percdamp: 0.02", 0.02)])
def test_a_number_in_exponent_notation_is_a_number(tmp_path, line, value):
    """Issue 35's probe: PyYAML follows YAML 1.1, where ``1e-2`` (no dot) is a string, and the
    recipe was refused as "quoted in the recipe?". Recipes read numbers as YAML 1.2 does."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: pb-llm\n{line}\n")
    assert recipe_config(recipe).percdamp == value


def test_a_folder_or_a_loop_of_links_as_recipe_is_named_as_such(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, problem in ((tmp_path, "is a folder"), (tmp_path / "loop", "is a loop of symbolic links")):
        with pytest.raises(LlmbinError) as info:
            recipe_config(path)
        assert str(info.value) == f"recipe {path} {problem}; give a recipe file (.yaml) or a shipped recipe's name"


# ARBXConfig's record before ARB-X became a recipe (a checkpoint's quantization_config, less the run's keys)
OLD_ARB_X = {"method": "arb-x", "salient_metric": "hessian", "max_salient_columns": 30, "split_points": 81,
             "refine_iters": 15, "refit_scales": True, "percdamp": 0.01, "blocksize": 128, "rotate": "none",
             "rotate_seed": 0}


def test_arb_x_is_a_billm_recipe_with_the_former_arb_x_defaults():
    import torch

    from llmbin.algorithms.billm import billm_quantize
    from llmbin.algorithms.hessian import damped_hessian, prepared_inverse
    from llmbin.algorithms.layer import quantize_layer
    from llmbin.algorithms.scales import refit_scales
    from llmbin.config import config_from_dict
    from llmbin.registry import method_function

    recipe = recipe_config(RECIPES[0].parent / "arb-x.yaml")
    assert recipe.method == "billm"
    assert recipe == config_from_dict(OLD_ARB_X)  # an old checkpoint's record reads as the recipe
    # its record: method billm, and the stage options added since at their defaults
    assert recipe.to_dict() == {**OLD_ARB_X, "method": "billm", "distill": False, "distill_epochs": 1,
                                "distill_lr": 1e-4}
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 160, generator=g) * torch.linspace(0.1, 4.0, 160)
    W, H = torch.randn(24, 160, generator=g) * 0.05, 2 * X.T @ X / 1024
    old = refit_scales(billm_quantize(W, H, recipe), prepared_inverse(W, H, 0.01)[0], damped_hessian(H, 0.01))
    new = quantize_layer(method_function(recipe), W, H, recipe)
    a, b = old.tensors("l"), new.tensors("l")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and old.metadata() == new.metadata()


def test_the_former_arb_x_method_points_to_its_recipe():
    from llmbin.config import available_methods, make_config

    assert "arb-x" not in available_methods()
    with pytest.raises(LlmbinError, match=r"^arb-x is a recipe now, not a method: use --recipe arb-x .*"
                                          r"refine_iters 15, refit_scales true"):
        make_config("arb-x")


def test_the_shipped_recipes_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(shipped_recipes()) == {p.stem for p in RECIPES}
    shipped = next(p for p in RECIPES if p.stem == "pb-llm-10")
    assert find_recipe("pb-llm-10") == find_recipe("pb-llm-10.yaml") == shipped
    assert recipe_config("pb-llm-10").salient_frac == 0.1


def test_a_relative_path_that_exists_is_that_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "pb-llm-10.yaml").write_text("method: pb-llm\nsalient_frac: 0.3\n")
    (tmp_path / "pb-llm-20").write_text("method: pb-llm\nsalient_frac: 0.4\n")  # a file shadows the shipped name
    assert recipe_config("recipes/pb-llm-10.yaml").salient_frac == 0.3
    assert recipe_config("pb-llm-20").salient_frac == 0.4


@pytest.mark.parametrize("recipe,hint", [
    ("pb-llm-11", " (did you mean pb-llm-10 or pb-llm-50?)"),
    ("recipes/pb-llm-10.yaml", " (did you mean pb-llm-10?)"),  # the checkout's path, from another folder
    ("nothing-like-it", ""),
])
def test_an_unknown_recipe_lists_the_shipped_ones(tmp_path, monkeypatch, recipe, hint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlmbinError) as info:
        find_recipe(recipe)
    folder = RECIPES[0].parent
    assert str(info.value) == (f"recipe {recipe} is neither a file nor a shipped recipe{hint}; the shipped recipes, in "
                               f"{folder}, are named without a path: {', '.join(sorted(p.stem for p in RECIPES))}")
