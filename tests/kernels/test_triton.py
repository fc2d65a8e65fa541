"""The Triton GPU kernel against the float64 reference: on the GPU when there is one, and in
Triton's interpreter on CPU (so CI checks it without a GPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmbin.kernels import triton_gpu
from llmbin.kernels.plan import build_plan
from tests.kernels.conftest import LAYOUTS, SHAPES, assert_matches_reference, random_packed

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not triton_gpu.available(), reason="Triton is not installed (pip install triton)")


def check_every_layout(device: str) -> None:
    """Every layout at awkward shapes, batch 1, 3 (broadcast path) and 17 (tl.dot path), into
    poisoned output buffers."""
    for layout in LAYOUTS:
        for i, (N, K, gs) in enumerate(SHAPES):
            pw = random_packed(layout, N, K, gs, seed=i)
            plan = build_plan(pw)
            plan = type(plan)(**{f: getattr(plan, f).to(device) if torch.is_tensor(getattr(plan, f)) else getattr(plan, f)
                                 for f in plan.__dataclass_fields__})
            for B in (1, 3, 17):
                x = torch.randn(B, K)
                out = torch.full((B, N), float("nan"), device=device)
                triton_gpu.packed_linear(x.to(device), plan, out)
                assert_matches_reference(out.cpu(), x, pw)


@needs_triton
def test_the_kernel_matches_the_reference_in_the_interpreter():
    code = "from tests.kernels.test_triton import check_every_layout; check_every_layout('cpu'); print('checked')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_the_kernel_matches_the_reference_on_the_gpu():
    check_every_layout("cuda")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_binary_linear_on_the_gpu_runs_the_kernel_and_matches_the_reference(monkeypatch):
    from llmbin.nn import BinaryLinear

    layer = BinaryLinear.from_float(torch.nn.Linear(300, 70)).cuda()
    x = torch.randn(5, 300, device="cuda")
    fast = layer(x)
    monkeypatch.setenv("LLMBIN_KERNEL", "reference")
    torch.testing.assert_close(fast, layer(x), rtol=1e-5, atol=1e-5)
