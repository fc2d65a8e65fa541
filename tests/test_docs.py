"""The README is a short front door whose figures come from the result records, and the docs site
builds with ``mkdocs build --strict`` (a broken link or anchor fails)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def docs_pages():
    spec = importlib.util.spec_from_file_location("docs_pages", ROOT / "eval" / "docs_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_generated_pages_and_readme_block_equal_the_records():
    stale = [str(path.relative_to(ROOT)) for path, text in docs_pages().generated().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    assert not stale, f"out of date with their records: {stale}; run python eval/docs_pages.py"


def test_readme_figures_are_inside_the_generated_block():
    """Outside the generated block the README states no measured figure (a decimal number)."""
    gen = docs_pages()
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(gen.START)
    tail = rest.split(gen.END)[1]
    outside = re.sub(r"```.*?```", "", head + tail, flags=re.DOTALL)  # commands may hold numbers
    outside = outside.replace("Python 3.10+", "").replace("Apache-2.0", "")  # versions, not figures
    assert not re.findall(r"\b\d+\.\d+\b|\d+ ?%", outside)


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    missing = [t for t in targets if not t.startswith(("http://", "https://", "#"))
               and not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_result_tables_name_their_machine_and_command():
    """Every measured table names its machine, and every page its command (the per-bit record
    names a machine in each row)."""
    gen = docs_pages()
    for source, record in gen.page_records().items():
        sections = list(gen._sections(record))
        tables = [s for s in sections if s.get("table") or s.get("tables")]
        for s in tables:
            specs = s.get("tables") or [s["table"]]
            if not all("pareto" in spec for spec in specs):
                assert s.get("machine"), f"{source}: section {s.get('id')} has a table but no machine"
        if tables:
            assert any(s.get("command") for s in sections), f"{source}: no command"


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("quantize", "eval"):
        assert f"llmbin {command}" in cli
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("quantize_and_save", "calibration_windows", "PBLLMConfig"):
        assert name in api
