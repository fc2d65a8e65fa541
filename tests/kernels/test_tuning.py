"""The CPU kernels' path thresholds: one setting with documented defaults, overridable by
environment variables, that the kernels actually use."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmbin.errors import LlmbinError
from llmbin.kernels import half, ops
from llmbin.kernels.tuning import TUNING, KernelTuning

ROOT = Path(__file__).resolve().parents[2]


def test_the_defaults_are_the_measured_values():
    assert KernelTuning() == KernelTuning(matvec_max_work=16, lut_max_work=96, band_bytes=4 << 20, half_max_rows=8)
    assert KernelTuning.from_env({}) == KernelTuning()


def test_each_field_has_an_environment_override():
    tuning = KernelTuning.from_env({"LLMBIN_KERNEL_MATVEC_MAX_WORK": "0", "LLMBIN_KERNEL_LUT_MAX_WORK": " 128 ",
                                    "LLMBIN_KERNEL_BAND_BYTES": "1048576", "LLMBIN_KERNEL_HALF_MAX_ROWS": "",
                                    "LLMBIN_KERNEL": "exact"})
    assert tuning == KernelTuning(matvec_max_work=0, lut_max_work=128, band_bytes=1 << 20)


@pytest.mark.parametrize("value", ["many", "-1", "1.5"])
def test_a_bad_override_names_the_variable_and_the_default(value):
    with pytest.raises(LlmbinError, match=r"LLMBIN_KERNEL_LUT_MAX_WORK=.* is not a whole number >= 0.*\(96\)"):
        KernelTuning.from_env({"LLMBIN_KERNEL_LUT_MAX_WORK": value})


def test_the_kernels_use_the_setting():
    assert (ops.MATVEC_MAX_WORK, ops.LUT_MAX_WORK, ops.BAND_BYTES) == (TUNING.matvec_max_work, TUNING.lut_max_work,
                                                                       TUNING.band_bytes)
    assert (half.MATVEC_MAX_ROWS, half.BAND_BYTES) == (TUNING.half_max_rows, TUNING.band_bytes)
    code = ("from llmbin.kernels import ops, half; "
            "print(ops.MATVEC_MAX_WORK, ops.LUT_MAX_WORK, ops.BAND_BYTES, half.MATVEC_MAX_ROWS, half.BAND_BYTES)")
    env = {**os.environ, "LLMBIN_KERNEL_MATVEC_MAX_WORK": "3", "LLMBIN_KERNEL_LUT_MAX_WORK": "5",
           "LLMBIN_KERNEL_BAND_BYTES": "4096", "LLMBIN_KERNEL_HALF_MAX_ROWS": "2"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3", "5", "4096", "2", "4096"]
