"""``import llmbin`` registers the ``llmbin`` quantizer with transformers without importing torch or
transformers itself: registering needs ``transformers.quantizers`` (about 3 s with torch), which
``llmbin --help`` must not wait for. So registration waits for transformers:

- if ``transformers.quantizers`` is already loaded, it registers at once;
- otherwise an import hook registers right after ``transformers.quantizers`` (which every
  ``from_pretrained`` imports first) or ``llmbin.checkpoint.hf_quantizer`` finishes loading.

Nothing else changes: ``AutoModelForCausalLM.from_pretrained(checkpoint)`` works after ``import llmbin``
whichever of the two was imported first.
"""
from __future__ import annotations

import sys
import warnings

QUANTIZER_MODULE = "llmbin.checkpoint.hf_quantizer"
WATCHED = ("transformers.quantizers", QUANTIZER_MODULE)


def register_now() -> None:
    """Register, unless the quantizer module is still being imported (it registers once it has loaded)."""
    module = sys.modules.get(QUANTIZER_MODULE)
    if module is not None and not hasattr(module, "register"):
        return
    from .checkpoint.hf_quantizer import register

    register()


def _loaded(name: str) -> bool:
    # a package still executing its __init__ is in sys.modules already, but lacks its last names
    module = sys.modules.get(name)
    return module is not None and hasattr(module, "HfQuantizer")


class _AfterImport:
    """A ``sys.meta_path`` finder that finds nothing itself: for the watched modules it asks the
    other finders and wraps the loader's ``exec_module``, so that registration runs once the
    module has executed. (Not an ``importlib.abc`` subclass: importing that costs more than the rest.)"""

    def find_spec(self, name, path=None, target=None):
        if name not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _AfterImport) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = _then_register(spec.loader.exec_module)
        return spec


def _then_register(exec_module):
    def run(module):
        exec_module(module)
        try:
            register_now()
        except Exception as exc:  # transformers must stay usable for other models
            warnings.warn(f"llmbin could not register its quantizer with transformers ({exc!r}); "
                          "llmbin checkpoints will not load through from_pretrained", stacklevel=2)

    return run


def install() -> None:
    """Register now if transformers' quantizers are loaded, else when they load (idempotent)."""
    if _loaded("transformers.quantizers"):
        register_now()
        return
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
