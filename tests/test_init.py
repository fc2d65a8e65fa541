"""``import llmbin`` is cheap (the public names load on first use) and the public names are the same as before."""
import subprocess
import sys
import types

import llmbin


def _run(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_import_llmbin_loads_neither_torch_nor_transformers():
    assert _run("import sys, llmbin\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
                "('torch', 'transformers', 'numpy')))") == "[]"


def test_every_public_name_resolves():
    assert llmbin.__all__ == sorted(llmbin._PUBLIC)
    for name in llmbin.__all__:
        assert not isinstance(getattr(llmbin, name), types.ModuleType), name
        assert name in dir(llmbin)
    assert llmbin.__version__


def test_llmbin_quantize_is_the_function_even_after_its_module_loads():
    # importing the submodule llmbin.quantize would set the package attribute to the module
    out = _run("import llmbin.quantize, llmbin\nfrom llmbin import quantize\n"
               "print(callable(llmbin.quantize), llmbin.quantize is quantize, type(llmbin.quantize).__name__)")
    assert out == "True True function"


def test_an_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llmbin.nope  # noqa: B018
