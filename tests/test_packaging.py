"""pyproject.toml lists its packages explicitly (the kernel source is mapped in from kernels/),
so a new subpackage must be added there or wheels would silently miss it."""
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_and_the_kernel_source_ships():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llmbin").rglob("__init__.py")}
    listed = set(tool["packages"])
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"
    source_dir = ROOT / tool["package-dir"]["llmbin.kernels.csrc"]
    from llmbin.kernels.cpu import SOURCES

    assert all(source.parent == source_dir and source.suffix == ".cpp" for source in SOURCES)
    assert tool["package-data"]["llmbin.kernels.csrc"] == ["*.cpp"]
    from llmbin.evaluate.zeroshot import OFFLINE_TASKS, TASK_DIR

    assert "llmbin.evaluate.tasks" not in tool["package-dir"] and TASK_DIR == ROOT / "llmbin" / "evaluate" / "tasks"
    assert tool["package-data"]["llmbin.evaluate.tasks"] == ["*.yaml"]
    assert all((TASK_DIR / f"{task}.yaml").is_file() for task in OFFLINE_TASKS)


def test_the_recipes_ship_as_package_data_and_are_found_by_name():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "llmbin.recipe_files" in tool["packages"]
    assert ROOT / tool["package-dir"]["llmbin.recipe_files"] == ROOT / "recipes"
    assert tool["package-data"]["llmbin.recipe_files"] == ["*.yaml"]
    from llmbin.recipes import shipped_recipes

    assert shipped_recipes() == {p.stem: p for p in sorted((ROOT / "recipes").glob("*.yaml"))}
