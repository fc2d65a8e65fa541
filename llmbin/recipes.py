"""Recipes: YAML files with a ``method`` key plus that method's config fields (the same schema as
the config dataclasses), so a published setting is one file. Explicit overrides win.

The shipped recipes (the checkout's ``recipes/`` folder, in a wheel ``llmbin/recipe_files/``) are
found by name from any folder: ``pb-llm-10`` or ``pb-llm-10.yaml``. Reading one needs no torch."""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from .config import QuantConfig, make_config
from .errors import LlmbinError, missing_path

SUFFIX = ".yaml"


def shipped_recipes() -> dict[str, Path]:
    """Name (file stem) -> file of every recipe that ships with llmbin."""
    return {path.stem: path for path in sorted(_shipped_files(), key=lambda p: p.stem)}


def _shipped_files() -> list[Path]:
    from importlib.resources import files

    try:  # a wheel, or an install that maps llmbin.recipe_files to recipes/
        return [Path(str(entry)) for entry in files("llmbin.recipe_files").iterdir() if entry.name.endswith(SUFFIX)]
    except (ImportError, OSError, TypeError):  # a checkout installed before that mapping existed
        pass
    for folder in (Path(__file__).with_name("recipe_files"), Path(__file__).resolve().parents[1] / "recipes"):
        if folder.is_dir():
            return sorted(folder.glob(f"*{SUFFIX}"))
    return []


def shipped_folder() -> Path | None:
    recipes = list(shipped_recipes().values())
    return recipes[0].parent if recipes else None


def find_recipe(recipe: str | os.PathLike) -> Path:
    """The recipe file: an existing path as given, else the shipped recipe of that name."""
    path = Path(recipe)
    if path.is_file():
        return path
    problem = missing_path(path)
    if problem and problem != "does not exist":  # a folder, a dangling link or a loop: no shipped name to guess
        raise LlmbinError(f"recipe {recipe} {problem}; give a recipe file (.yaml) or a shipped recipe's name")
    shipped = shipped_recipes()
    name = path.name.removesuffix(SUFFIX)
    if path.name == str(recipe) and name in shipped:  # a bare name; a path that does not exist is not guessed at
        return shipped[name]
    raise LlmbinError(unknown_recipe(str(recipe), shipped))


def unknown_recipe(recipe: str, shipped: dict[str, Path]) -> str:
    name = Path(recipe).name.removesuffix(SUFFIX)
    close = [name] if name in shipped else difflib.get_close_matches(name, shipped, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    if not shipped:
        return f"recipe {recipe} does not exist{hint}; give the path of a recipe file"
    return (f"recipe {recipe} is neither a file nor a shipped recipe{hint}; the shipped recipes, in "
            f"{shipped_folder()}, are named without a path: {', '.join(shipped)}")


def read_recipe(recipe: str | os.PathLike) -> dict:
    """The recipe (a file, or a shipped recipe's name) as a dict with ``method`` and option keys;
    a missing or unreadable one raises ``LlmbinError``."""
    import yaml

    path = find_recipe(recipe)
    try:
        data = yaml.load(path.read_text(), Loader=_recipe_loader())
    except yaml.YAMLError as exc:
        raise LlmbinError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict) or "method" not in data:
        raise LlmbinError(f"recipe {path} must be a mapping with a 'method' key and that method's options")
    return data


def yaml_value(text: str):
    """One YAML value (e.g. a command line's ``[{match: mlp.down_proj, planes: 2}]``), read as recipes are."""
    import yaml

    try:
        return yaml.load(text, Loader=_recipe_loader())
    except yaml.YAMLError as exc:
        raise LlmbinError(f"{text!r} is not valid YAML ({str(exc).splitlines()[0]})") from None


def _recipe_loader():
    """PyYAML's safe loader, with YAML 1.2's floats: PyYAML follows YAML 1.1, where ``1e-2`` (no
    dot) is a string, so ``percdamp: 1e-2`` was refused as if it had been quoted."""
    import re

    import yaml

    class RecipeLoader(yaml.SafeLoader):
        pass

    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                       list("-+0123456789."))
    return RecipeLoader


def recipe_config(recipe: str | os.PathLike, method: str | None = None, **overrides) -> QuantConfig:
    """Config from a recipe (a file, or a shipped recipe's name such as ``pb-llm-10``) with
    ``overrides`` (e.g. command-line options) taking precedence. ``method``, if given, must agree
    with the recipe's."""

    data = read_recipe(recipe)
    recipe_method = data.pop("method")
    if method is not None and method != recipe_method:
        raise LlmbinError(f"--method {method} contradicts recipe {recipe} (method: {recipe_method}); drop one of them")
    return make_config(recipe_method, **{**data, **overrides})
