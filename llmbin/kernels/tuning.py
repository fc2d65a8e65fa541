"""Where the CPU kernels switch paths: a setting, read once at import, each field overridable by
an environment variable ``LLMBIN_KERNEL_<FIELD>`` (for example ``LLMBIN_KERNEL_LUT_MAX_WORK=128``).

The best values depend on the machine (its cores, caches and BLAS), so the defaults are
measurements, not laws. They were measured on the development machine, an AMD EPYC Milan with
2 cores and AVX2, with torch's CPU GEMM:

* ``matvec_max_work``: the packed-bit float path (``LLMBIN_KERNEL=exact``) ties with band
  decode + GEMM at batch 16 on a 4096 × 4096 layer.
* ``lut_max_work``: the table-lookup path costs about a quarter as much per row as the float
  path and ties with fp32 GEMM near batch 128 on SmolLM2-135M's layers; the default, 96, stays
  below that.
* ``band_bytes``: a band of about 4 MiB of decoded fp32 rows stays in cache between the decode
  and the GEMM that reads it.
* ``half_max_rows``: past 8 rows the 16-bit weight is read once per band anyway, and widening
  bands + GEMM wins over the 16-bit-weight kernel.
* ``rotate_max_rows``: a rotation's C++ transform goes a row at a time; it replaces torch's small
  products per Kronecker factor, whose per-op cost dominates at decode batches. 8, as for the
  16-bit kernel; measured at batch 1 only.

To re-measure on another machine, force each path with the overrides and compare the
``packed`` column of ``eval/kernel_benchmark.py`` over batches around the crossover::

    B="--skip-e2e --batches 32 64 96 128 192"
    LLMBIN_KERNEL_LUT_MAX_WORK=100000 python eval/kernel_benchmark.py $B  # always table lookup
    LLMBIN_KERNEL_LUT_MAX_WORK=0 LLMBIN_KERNEL_MATVEC_MAX_WORK=0 python eval/kernel_benchmark.py $B  # always GEMM

and the same with ``LLMBIN_KERNEL=exact`` and ``LLMBIN_KERNEL_MATVEC_MAX_WORK`` for the float
path. The benchmark's packed layers have one bit product, so its batch is the work.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import LlmbinError

ENV_PREFIX = "LLMBIN_KERNEL_"


@dataclass(frozen=True)
class KernelTuning:
    """The CPU kernels' path thresholds. A batch of ``B`` rows through a layer of ``n`` bit
    products is ``B · n`` units of work."""

    matvec_max_work: int = 16  # the packed-bit float path serves work up to this; past it, bands + GEMM
    lut_max_work: int = 96  # the same for the table-lookup path (the default on AVX2 CPUs); BinaryLinear
    # also serves calls of more rows than this from a light plan (no tiles, the salient part read in place)
    band_bytes: int = 4 << 20  # the large-batch path decodes bands of rows of about this many fp32 bytes
    half_max_rows: int = 8  # the 16-bit-weight kernel serves batches up to this; past it, widened bands + GEMM
    rotate_max_rows: int = 8  # the rotation kernel serves batches up to this; past it, torch's products per factor

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KernelTuning:
        """The defaults, with each ``LLMBIN_KERNEL_<FIELD>`` that is set (a whole number ≥ 0) in place of its field."""
        values = {}
        for field in dataclasses.fields(cls):
            name = ENV_PREFIX + field.name.upper()
            text = environ.get(name, "").strip()
            if not text:
                continue
            if not text.isdigit():
                raise LlmbinError(f"{name}={text!r} is not a whole number >= 0; unset it to use the default "
                                  f"({field.default})")
            values[field.name] = int(text)
        return cls(**values)


TUNING = KernelTuning.from_env()  # read once, at import; ``ops``, ``half`` and ``rotate`` take their thresholds from it
