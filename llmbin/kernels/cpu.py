"""The C++ CPU kernel, compiled just in time on first use and cached by torch's extension
builder (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); a source change
rebuilds it. Without a compiler the build fails once, with a one-line warning, and callers use
the plain-torch reference path."""
from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

_NAME = "packed_matmul_cpu.cpp"
# A wheel ships it as llmbin/kernels/csrc/; a source checkout keeps it in the top-level kernels/.
SOURCE = next((p for p in (Path(__file__).with_name("csrc") / _NAME, Path(__file__).parents[2] / "kernels" / _NAME)
               if p.exists()), Path(__file__).parents[2] / "kernels" / _NAME)
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module, or None when it cannot be built here."""
    if shutil.which("ninja") is None:  # pip's ninja sits next to this interpreter, maybe not on PATH
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name="llmbin_packed_cpu", sources=[str(SOURCE)],
                                  extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                  verbose=bool(os.environ.get("LLMBIN_KERNEL_VERBOSE")))
    except Exception as exc:  # noqa: BLE001 (any build failure means: use the reference path)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"llmbin: the CPU kernel could not be built ({reason}); using the slower plain-torch "
                      "reference path. Install a C++ compiler (g++ or clang) and ninja to get it.", stacklevel=2)
        return None
