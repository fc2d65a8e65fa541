"""``--model llmbin``: lm-eval's ``hf`` model, split over processes on CPUs too. Two processes
under torchrun score half the requests each and report what one process reports."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import packed_checkpoint, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    calibration = torch.randint(0, 300, (4, 32))
    return packed_checkpoint(tiny_model("llama"), calibration, tmp_path_factory.mktemp("ckpt") / "llama", tokenizer)[1]


def _evaluate(checkpoint, out, world):
    from llmbin.evaluate.zeroshot import TASK_DIR, resolve_task_data

    env = {**os.environ, "LLMBIN_TASK_DATA": str(resolve_task_data(None)), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
                                   if world > 1 else [])
    run = subprocess.run(launcher + ["-m", "llmbin.lm_eval", "run", "--model", "llmbin", "--model_args",
                                     f"pretrained={checkpoint},dtype=float32", "--tasks", "piqa", "--limit", "6",
                                     "--device", "cpu", "--include_path", str(TASK_DIR), "--output_path", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(Path(out).rglob("results_*.json")).read_text())["results"]
    scored = [int(n) for n in re.findall(r"Running loglikelihood requests:\s+0%\|[^|]*\| 0/(\d+)", run.stderr)]
    return results, scored


def test_two_cpu_processes_share_the_requests_and_agree_with_one(checkpoint, tmp_path):
    one, one_scored = _evaluate(checkpoint, tmp_path / "one", 1)
    two, two_scored = _evaluate(checkpoint, tmp_path / "two", 2)
    assert one_scored == [12] and two_scored == [6]  # 6 questions × 2 choices; rank 0's share (it alone shows a bar)
    assert two == one and 0 <= one["piqa"]["acc,none"] <= 1
