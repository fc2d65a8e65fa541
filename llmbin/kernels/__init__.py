"""Packed-bit matmul: the lowering of every layout to bit products (``plan``), the
``llmbin::packed_linear`` operator (``ops``), the C++ CPU kernel's just-in-time build (``cpu``;
its source is the top-level ``kernels/packed_matmul_cpu.cpp``) and where the CPU paths switch
(``tuning``).

Each submodule is imported by name (``llmbin.kernels.ops``, ``.plan``, ``.dispatch``, ``.tuning``); this
``__init__`` imports nothing, so that no submodule's import runs back through it."""
