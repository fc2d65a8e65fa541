"""The library's imports form layers: no import circle, direct or hidden (a function-level import, or a
subpackage ``__init__`` that imports its siblings), and no module imports the top-level package."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmbin"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every llmbin module ``name`` imports, at any depth of its code, plus the subpackage
    ``__init__`` files Python runs on the way (the top-level package's excepted: it is the facade)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package itself
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t in known:
                found.add(t)
    with_parents = set(found)
    for t in found:
        parts = t.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(2, len(parts))}
    return with_parents - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_module_imports_the_top_level_package():
    offenders = sorted(name for name, deps in graph().items() if "llmbin" in deps and name != "llmbin")
    assert offenders == []


def test_no_import_circle():
    edges = graph()
    edges["llmbin"] = set()  # the facade imports everything; nothing below imports it (tested above)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_a_hidden_circle(tmp_path, monkeypatch):
    # a function-level import back up is a circle too (as models <-> nn.half_weights once was)
    pkg = tmp_path / "llmbin"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nn" / "__init__.py").write_text("")
    (pkg / "models.py").write_text("from .nn import half\n")
    (pkg / "nn" / "half.py").write_text("def f():\n    from ..models import g\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    edges = graph()
    assert "llmbin.models" in edges["llmbin.nn.half"] and "llmbin.nn.half" in edges["llmbin.models"]
