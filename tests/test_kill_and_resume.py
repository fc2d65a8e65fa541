"""kill -9 at any point of ``llmbin quantize``, then the same command again: the checkpoint is the
one an uninterrupted run writes, byte for byte (same machine, same thread count)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from llmbin.checkpoint.digests import file_digests

BLOCKS = 6


@pytest.fixture(scope="module")
def six_block_dir(tmp_path_factory, tokenizer):
    from tests.conftest import saved_tiny_model

    return saved_tiny_model(tmp_path_factory.mktemp("six") / "model", tokenizer, num_hidden_layers=BLOCKS)


def _command(model_dir, text_file, out):
    return [sys.executable, "-m", "llmbin.cli", "quantize", "--model", str(model_dir), "--method", "db-llm",
            "--calib-data", str(text_file), "--nsamples", "8", "--seqlen", "64", "--out", str(out), "--no-progress"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _kill_when(command, ready, timeout=120.0):
    """Start ``command``, SIGKILL it as soon as ``ready()`` holds (or when it ends), return its exit status."""
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    return proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(six_block_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "ckpt"
    subprocess.run(_command(six_block_dir, text_file, out), env=_env(), check=True, capture_output=True)
    return file_digests(out / "model.safetensors")


def _blocks(out):
    partial = out.parent / f"{out.name}.partial"
    return len(list(partial.glob("block_*.safetensors"))) if partial.exists() else 0


@pytest.mark.parametrize("moment", ["after 2 blocks", "after 5 blocks", "while saving", "at a random time"])
def test_a_killed_run_resumes_to_the_uninterrupted_checkpoint(six_block_dir, text_file, tmp_path, uninterrupted, moment):
    out = tmp_path / "ckpt"
    command = _command(six_block_dir, text_file, out)
    if moment.startswith("after"):
        wanted = int(moment.split()[1])
        ready = lambda: _blocks(out) >= wanted  # noqa: E731
    elif moment == "while saving":
        ready = lambda: any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())  # noqa: E731
    else:
        start, delay = time.monotonic(), random.uniform(1.0, 8.0)  # anywhere from imports to the end
        ready = lambda: time.monotonic() - start > delay  # noqa: E731
    status = _kill_when(command, ready)
    if moment != "at a random time":
        assert status == -signal.SIGKILL
    if out.exists():  # killed after the rename: the checkpoint under the final name is always complete
        assert file_digests(out / "model.safetensors") == uninterrupted
        rerun = subprocess.run(command, env=_env(), capture_output=True, text=True)
        assert rerun.returncode == 2 and "already exists" in rerun.stderr  # and it clears what the kill left
    else:
        subprocess.run(command, env=_env(), check=True, capture_output=True)
    assert file_digests(out / "model.safetensors") == uninterrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .partial, no .ckpt.tmp-PID left


def test_a_tuned_run_killed_while_tuning_a_block_resumes_to_the_uninterrupted_checkpoint(six_block_dir, text_file,
                                                                                       tmp_path):
    tuned = ["--tune", "--tune-steps", "4"]
    whole = tmp_path / "whole"
    subprocess.run(_command(six_block_dir, text_file, whole) + tuned, env=_env(), check=True, capture_output=True)
    out = tmp_path / "ckpt"
    command = _command(six_block_dir, text_file, out) + tuned
    # two blocks are saved: the kill lands while the third is quantized or tuned, before it is saved
    assert _kill_when(command, lambda: _blocks(out) >= 2) == -signal.SIGKILL
    subprocess.run(command, env=_env(), check=True, capture_output=True)
    assert file_digests(out / "model.safetensors") == file_digests(whole / "model.safetensors")


def test_the_run_after_a_silent_kill_says_that_the_last_one_died_and_what_to_change(six_block_dir, text_file, tmp_path,
                                                                                    uninterrupted):
    """Issue 35's probe: an out-of-memory kill (SIGKILL) left exit status 137 and no word; the next
    run resumed without saying what had happened or what to change."""
    out = tmp_path / "ckpt"
    command = _command(six_block_dir, text_file, out)
    assert _kill_when(command, lambda: _blocks(out) >= 2) == -signal.SIGKILL
    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    said = [line for line in rerun.stderr.splitlines() if "died without a word" in line]
    assert len(said) == 1 and said[0].startswith(f"llmbin: the last run on {out} (pid ") and said[0].endswith(
        f"Its finished blocks in {out}.partial are resumed; if memory was short, add --offload-activations DIR, or use "
        "fewer --nsamples or a smaller --seqlen"), rerun.stderr
    assert file_digests(out / "model.safetensors") == uninterrupted


def test_a_run_that_ended_in_a_way_python_sees_is_not_reported_as_killed(six_block_dir, text_file, tmp_path):
    out = tmp_path / "ckpt"
    stopped = subprocess.run(_command(six_block_dir, text_file, out) + ["--stop-after-blocks", "1"], env=_env(),
                             capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    rerun = subprocess.run(_command(six_block_dir, text_file, out) + ["--stop-after-blocks", "1"], env=_env(),
                           capture_output=True, text=True)
    assert rerun.returncode == 0 and "died without a word" not in rerun.stderr


def test_a_silent_kill_is_reported_at_once_by_the_runs_watcher(six_block_dir, text_file, tmp_path):
    out = tmp_path / "ckpt"
    proc = subprocess.Popen(_command(six_block_dir, text_file, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _blocks(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # the watcher holds the pipe until it has spoken
    said = [line for line in err.splitlines() if "died without a word" in line]
    assert len(said) == 1 and said[0].startswith(f"llmbin: quantizing {out} died without a word: ") and said[0].endswith(
        "Its finished blocks, if any, are kept for the rerun; if memory was short, rerun with --offload-activations DIR, "
        "or fewer --nsamples or a smaller --seqlen"), err[-2000:]
    done = subprocess.run(_command(six_block_dir, text_file, out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "llmbin: quantizing" not in done.stderr  # a run that ends is not reported


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_stops_the_run_in_one_line_and_keeps_its_blocks(six_block_dir, text_file, tmp_path,
                                                                           uninterrupted, signum):
    """The second probe: a SIGTERM (a scheduler's time limit) or SIGHUP (a closed terminal) ended the
    run without a word, and its watcher then blamed a SIGKILL; both now stop the run as Ctrl-C does."""
    out = tmp_path / "ckpt"
    command = _command(six_block_dir, text_file, out)
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _blocks(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    kept = _blocks(out)
    assert proc.returncode == 2 and kept >= 1, err[-2000:]
    assert err.strip().splitlines() == [f"llmbin: error: stopped by {signum.name}; {kept} finished blocks are kept in "
                                        f"{out}.partial, rerun the same command to resume"]
    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0 and "died without a word" not in rerun.stderr, rerun.stderr[-2000:]
    assert file_digests(out / "model.safetensors") == uninterrupted
