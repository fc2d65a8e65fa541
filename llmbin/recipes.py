"""Recipes: YAML files with a ``method`` key plus that method's config fields (the same schema as
the config dataclasses), so a published setting is one file. Explicit overrides win."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from .config import QuantConfig
from .errors import LlmbinError
from .registry import make_config


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe as a dict with ``method`` and option keys; unreadable files raise ``LlmbinError``."""
    path = Path(path)
    if not path.is_file():
        raise LlmbinError(f"recipe {path} does not exist; see recipes/ for the shipped ones")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LlmbinError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict) or "method" not in data:
        raise LlmbinError(f"recipe {path} must be a mapping with a 'method' key and that method's options")
    return data


def recipe_config(path: str | os.PathLike, method: str | None = None, **overrides) -> QuantConfig:
    """Config from a recipe file with ``overrides`` (e.g. command-line options) taking precedence.
    ``method``, if given, must agree with the recipe's."""
    data = read_recipe(path)
    recipe_method = data.pop("method")
    if method is not None and method != recipe_method:
        raise LlmbinError(f"--method {method} contradicts recipe {path} (method: {recipe_method}); drop one of them")
    return make_config(recipe_method, **{**data, **overrides})
