"""``torchrun -m llmbin quantize``: one, two and three processes (gloo, one thread each) write the
same checkpoint tensor for tensor, a run resumes at another world size, and a misfit launch is refused."""
import os
import subprocess
import sys

import pytest
import torch

from llmbin import distributed
from llmbin.checkpoint.digests import file_digests
from tests.conftest import saved_tiny_model

BLOCKS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return saved_tiny_model(tmp_path_factory.mktemp("dist") / "model", tokenizer, num_hidden_layers=BLOCKS)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(world, model_dir, text_file, out, *extra, nsamples=12, method="pb-llm"):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    command = ([sys.executable] if world == 1 else launcher) + [
        "-m", "llmbin", "quantize", "--model", str(model_dir), "--method", method, "--calib-data", str(text_file),
        "--nsamples", str(nsamples), "--seqlen", "32", "--out", str(out), "--no-progress", *extra]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_process(model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "ckpt"
    done = _run(1, model_dir, text_file, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _same_checkpoint(a, b):
    """Every stored tensor's digest, the header metadata and the config (the file's bytes may differ
    in the order of the header's keys, which safetensors writes from a hash map)."""
    from safetensors import safe_open

    assert file_digests(a / "model.safetensors") == file_digests(b / "model.safetensors")
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        assert fa.metadata() == fb.metadata()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


@pytest.mark.parametrize("world", [2, 3])
def test_any_world_size_writes_the_one_process_checkpoint(model_dir, text_file, tmp_path, one_process, world):
    # 12 windows are 3 chunks: with 2 processes the Hessian total goes 0 -> 1 -> 0, with 3 it visits each
    out = tmp_path / "ckpt"
    done = _run(world, model_dir, text_file, out)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_checkpoint(out, one_process)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # rank 0 alone wrote, and cleaned up


def test_a_rotated_grouped_mix_is_the_same_in_two_processes(model_dir, text_file, tmp_path):
    # rotations, group terms and per-layer plane counts travel in each layer's description, not in its tensors
    one, two = tmp_path / "one", tmp_path / "two"
    for world, out in ((1, one), (2, two)):
        done = _run(world, model_dir, text_file, out, "--rotate", "input", "--planes", "1", "--group-size", "16",
                    "--layers", "[{match: mlp.down_proj, planes: 2, group_size: 0}]", method="db-llm")
        assert done.returncode == 0, done.stderr[-3000:]
    _same_checkpoint(one, two)


def test_two_machines_write_the_one_process_checkpoint(model_dir, text_file, tmp_path, one_process):
    # two "nodes" of one process each (torchrun --nnodes 2, static rendezvous on this machine): the
    # second's process is LOCAL_RANK 0 but not rank 0, so it must neither write nor claim the output
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ckpt"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
         "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "llmbin", "quantize", "--model",
         str(model_dir), "--method", "pb-llm", "--calib-data", str(text_file), "--nsamples", "12", "--seqlen", "32",
         "--out", str(out), "--no-progress"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    results = [(node.communicate(timeout=600), node.returncode) for node in nodes]
    assert all(code == 0 for _, code in results), [err[-3000:] for (_, err), _ in results]
    _same_checkpoint(out, one_process)
    assert "wrote" in results[0][0][0] and "wrote" not in results[1][0][0]  # rank 1 reported nothing of its own


def test_a_run_stopped_in_one_process_resumes_in_two_to_the_same_checkpoint(model_dir, text_file, tmp_path,
                                                                          one_process):
    out = tmp_path / "ckpt"
    first = _run(1, model_dir, text_file, out, "--stop-after-blocks", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _run(2, model_dir, text_file, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: block 0 of 3 is done" in resumed.stdout
    _same_checkpoint(out, one_process)


def test_tuned_blocks_are_the_same_in_two_processes_and_resume_in_one(model_dir, text_file, tmp_path):
    # 3 windows a step: a step's windows lie on both ranks, and the 5 steps run past the 12 windows
    # into a second shuffled pass, so a step may hold one window twice
    tune = ("--tune", "--tune-steps", "5", "--tune-batch", "3")
    one, out = tmp_path / "one", tmp_path / "ckpt"
    done = _run(1, model_dir, text_file, one, *tune)
    assert done.returncode == 0, done.stderr[-3000:]
    first = _run(2, model_dir, text_file, out, *tune, "--stop-after-blocks", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _run(1, model_dir, text_file, out, *tune)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: blocks 0-1 of 3 are done" in resumed.stdout
    _same_checkpoint(out, one)


def test_more_processes_than_chunks_is_refused_by_name(model_dir, text_file, tmp_path):
    done = _run(2, model_dir, text_file, tmp_path / "ckpt", nsamples=4)
    assert done.returncode != 0
    assert ("llmbin: error: rank 0 of 2: 2 processes but 4 calibration windows make only 1 chunks of 4; launch at "
            "most 1 processes or give more --nsamples") in done.stderr.splitlines()
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.partial").exists()


def test_chunks_and_their_owners_do_not_depend_on_the_world_size():
    assert [list(c) for c in distributed.chunks(10)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert distributed.own_windows(distributed.Ranks(1, 2), 10) == [4, 5, 6, 7]
    assert distributed.own_windows(distributed.Ranks(0, 2), 10) == [0, 1, 2, 3, 8, 9]
    assert sorted(w for r in range(3) for w in distributed.own_windows(distributed.Ranks(r, 3), 10)) == list(range(10))


def test_layers_are_spread_largest_first_to_the_least_loaded_rank():
    # q, k, v, o, gate, up, down of a Llama-like block: down alone is as costly as gate and up together
    assert distributed.assign([1, 1, 1, 1, 4, 4, 8], 2) == [0, 1, 0, 1, 1, 1, 0]
    assert distributed.assign([3, 3], 1) == [0, 0]


@pytest.fixture(scope="module")
def slower_model_dir(tmp_path_factory, tokenizer):
    """Blocks that take a few seconds each, so a rank can be killed mid-run."""
    return saved_tiny_model(tmp_path_factory.mktemp("slower") / "model", tokenizer, num_hidden_layers=6,
                            hidden_size=256, intermediate_size=512)


def test_a_killed_rank_stops_the_run_in_one_line_and_its_blocks_resume(slower_model_dir, text_file, tmp_path):
    import signal
    import time

    import psutil

    out = tmp_path / "ckpt"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llmbin"]
    args = ["quantize", "--model", str(slower_model_dir), "--method", "pb-llm", "--calib-data", str(text_file),
            "--nsamples", "8", "--seqlen", "128", "--out", str(out), "--no-progress"]
    run = subprocess.Popen(launcher + args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "ckpt.partial").glob("block_*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.02)
    rank1 = next(p for p in psutil.Process(run.pid).children() if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGKILL)  # as the out-of-memory killer would
    killed = time.monotonic()
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0 and time.monotonic() - killed < 60
    said = [line for line in err.splitlines() if line.startswith("llmbin: error: rank 0 of 2: ")]
    assert len(said) == 1 and "finished blocks are kept in" in said[0] and "rerun the same command" in said[0], err[-3000:]
    assert not [line for line in err.splitlines() if line.startswith("[rank0]:")], err[-3000:]  # no traceback of ours
    kept = len(list((tmp_path / "ckpt.partial").glob("block_*.safetensors")))
    assert 1 <= kept < 6
    resumed = subprocess.run([sys.executable, "-m", "llmbin", *args], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: block 0 of 6 is done" in resumed.stdout if kept == 1 else f"blocks 0-{kept - 1} of 6" in resumed.stdout
    whole = tmp_path / "whole"
    assert subprocess.run([sys.executable, "-m", "llmbin", *args[:-3], "--out", str(whole), "--no-progress"],
                          env=_env(), capture_output=True).returncode == 0
    _same_checkpoint(out, whole)


def test_launch_mistakes_are_named_before_joining(monkeypatch):
    from llmbin.errors import LlmbinError

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(LlmbinError, match="WORLD_SIZE='two' in the environment is not a number; launch with torchrun"):
        distributed.init_from_environment("cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LlmbinError, match=r"LOCAL_RANK 3 but this machine has 2 CUDA GPU\(s\); launch at most one "
                                          r"process per GPU \(--nproc-per-node\)"):
        distributed.init_from_environment("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")  # not launched: nothing joined, the device as given
    assert distributed.init_from_environment("cuda:1") == (distributed.SINGLE, "cuda:1")
