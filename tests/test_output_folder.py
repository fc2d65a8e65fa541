"""The output folder under faults: a second run, an unwritable or full disk, leftovers of killed runs.
Every case is a one-line error (exit status 2) that leaves no half-written checkpoint behind."""
import errno
import fcntl
import os
import subprocess

import pytest

from llmbin.checkpoint.folder import LOCK_FILE, claim_output, release_output, work_dir
from llmbin.cli import main


def _quantize(model_dir, text_file, out, *extra):
    return main(["quantize", "--model", str(model_dir), "--method", "pb-llm", "--calib-data", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--no-progress", *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmbin: error: "), err
    return err.strip()


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model is loaded: the check under test must come first."""
    monkeypatch.setattr("llmbin.models.open_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_a_second_run_on_the_same_out_fails_at_once(tiny_model_dir, text_file, tmp_path, capsys, no_model_load):
    out = tmp_path / "ckpt"
    work = work_dir(out)
    work.mkdir()
    with open(work / LOCK_FILE, "a") as held:  # another process's lock (a separate open file)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _quantize(tiny_model_dir, text_file, out) == 2
    assert _one_line_error(capsys) == (f"llmbin: error: another llmbin run is writing {out} (it holds {work / LOCK_FILE}); "
                                       "wait for it to finish or choose another --out")
    assert not out.exists()


def test_a_read_only_file_system_fails_before_the_model_loads(tiny_model_dir, text_file, tmp_path, capsys,
                                                              no_model_load, monkeypatch):
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    assert _quantize(tiny_model_dir, text_file, tmp_path / "ro" / "ckpt") == 2
    assert _one_line_error(capsys) == (f"llmbin: error: cannot write {tmp_path}/ro/ckpt.partial (Read-only file system); "
                                       "choose an --out in a folder you can write")
    assert not (tmp_path / "ro").exists()


@pytest.mark.parametrize("bad,message", [
    (["--nsamples", "0"], "--nsamples and --seqlen must be positive, got 0 and 32"),
    (["--device", "cuda:7"], "--device cuda:7: "),
    (["--device", "tpu"], "--device 'tpu' is not a device name"),
])
def test_bad_options_fail_before_the_model_loads(tiny_model_dir, text_file, tmp_path, capsys, no_model_load, bad, message):
    assert _quantize(tiny_model_dir, text_file, tmp_path / "ckpt", *bad) == 2
    assert message in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_json_report_into_a_missing_folder_fails_before_any_work(tiny_model_dir, text_file, tmp_path, capsys,
                                                                    no_model_load):
    assert _quantize(tiny_model_dir, text_file, tmp_path / "ckpt", "--json", str(tmp_path / "no" / "q.json")) == 2
    assert f"folder {tmp_path}/no does not exist" in _one_line_error(capsys)
    assert main(["eval", str(tmp_path / "ckpt"), "--json", str(tmp_path / "no" / "e.json")]) == 2
    assert f"folder {tmp_path}/no does not exist" in _one_line_error(capsys)


def test_a_json_report_path_that_is_a_folder_fails_before_any_work(tiny_model_dir, text_file, tmp_path, capsys,
                                                                     no_model_load):
    """Issue 35's probe: ``llmbin eval ... --json DIR`` ran the whole evaluation, then lost it to
    ``IsADirectoryError``."""
    (tmp_path / "reports").mkdir()
    assert _quantize(tiny_model_dir, text_file, tmp_path / "ckpt", "--json", str(tmp_path / "reports")) == 2
    assert _one_line_error(capsys) == (f"llmbin: error: --json {tmp_path}/reports is a folder; give a file path, "
                                       f"such as {tmp_path}/reports/report.json")
    assert main(["eval", str(tmp_path / "ckpt"), "--json", str(tmp_path / "reports")]) == 2
    assert f"--json {tmp_path}/reports is a folder" in _one_line_error(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["reports"]


def test_a_json_report_replaces_the_file_and_never_writes_through_a_link(tmp_path):
    """Issue 35's probe: ``--json`` overwrote an existing file in place and followed a link into its
    target. The report is written beside the path and renamed over it."""
    import json

    from llmbin.cli import _write_json

    victim, report = tmp_path / "victim.txt", tmp_path / "r.json"
    victim.write_text("keep me")
    report.symlink_to(victim)
    _write_json(str(report), {"ppl": 1.5})
    assert victim.read_text() == "keep me" and not report.is_symlink() and json.loads(report.read_text()) == {"ppl": 1.5}
    inode = report.stat().st_ino
    _write_json(str(report), {"ppl": 2.5})
    assert report.stat().st_ino != inode and json.loads(report.read_text()) == {"ppl": 2.5}
    with pytest.raises(TypeError):
        _write_json(str(report), {"ppl": object()})  # a failed write keeps the last report and leaves no temporary file
    assert json.loads(report.read_text()) == {"ppl": 2.5} and sorted(p.name for p in tmp_path.iterdir()) == [
        "r.json", "victim.txt"]


def test_a_failed_run_leaves_nothing_that_blocks_the_corrected_rerun(tiny_model_dir, text_file, tmp_path, capsys,
                                                                      monkeypatch):
    out = tmp_path / "ckpt"
    monkeypatch.setattr("llmbin.driver.capture_block_inputs", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _quantize(tiny_model_dir, text_file, out) == 2  # interrupted before any block finished
    capsys.readouterr()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert _quantize(tiny_model_dir, text_file, out, "--salient-frac", "0.2") == 0  # other options: nothing to mix


def test_a_temporary_folder_of_a_killed_save_is_removed_by_the_next_run(tiny_model_dir, text_file, tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()  # its pid no longer runs
    stale = tmp_path / f".ckpt.tmp-{proc.pid}"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    assert _quantize(tiny_model_dir, text_file, tmp_path / "ckpt") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _small_disk(path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (root only); False where this machine does not allow it."""
    path.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


@pytest.mark.parametrize("size", ["12k", "64k"], ids=["full at the first block", "full while saving"])
def test_a_full_disk_is_a_one_line_error_with_nothing_half_written(tiny_model_dir, text_file, tmp_path, capsys,
                                                                    monkeypatch, size):
    disk = tmp_path / "disk"
    mounted = _small_disk(disk, size)
    if not mounted:  # without root: the writer meets what a full disk raises, while writing a tensor
        from llmbin.checkpoint import tensors

        real_write, writes = tensors.write_streamed, {"left": 0 if size == "12k" else 99}

        def filling(path, shapes, fetch, layers):
            writes["left"] -= 1

            def fetch_or_full(name):
                if writes["left"] < 0 or (size == "64k" and "tmp-" in str(path)):
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                return fetch(name)
            return real_write(path, shapes, fetch_or_full, layers)

        monkeypatch.setattr("llmbin.checkpoint.tensors.write_streamed", filling)
        monkeypatch.setattr("llmbin.checkpoint.shards.write_streamed", filling)
    try:
        assert _quantize(tiny_model_dir, text_file, disk / "ckpt") == 2
        assert "no space left on the device while writing" in _one_line_error(capsys)
        left = sorted(p.name for p in disk.iterdir())
        assert "ckpt" not in left and not [n for n in left if n.startswith(".ckpt.tmp")]
        # finished blocks are kept for the rerun; a run that finished none leaves nothing
        assert left == ([] if size == "12k" else ["ckpt.partial"])
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_claiming_twice_in_one_process_is_allowed_and_release_unlocks(tmp_path):
    out = tmp_path / "ckpt"
    assert claim_output(out) == claim_output(out) == work_dir(out)
    release_output(out, remove=True)
    assert not work_dir(out).exists()


def test_a_partial_folder_left_beside_a_complete_checkpoint_is_removed(tmp_path):
    from llmbin.errors import LlmbinError

    out = tmp_path / "ckpt"
    out.mkdir()  # complete (it only ever appears complete), but the run was killed before removing its work folder
    (work_dir(out) / "block_00000.safetensors").parent.mkdir()
    (work_dir(out) / LOCK_FILE).write_text("")
    with pytest.raises(LlmbinError, match="already exists"):
        claim_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_resume_with_other_options_is_refused_before_the_model_loads(tiny_model_dir, text_file, tmp_path, capsys,
                                                                         monkeypatch):
    from tests.conftest import interrupt_after_first_block

    out = tmp_path / "ckpt"
    with interrupt_after_first_block(monkeypatch):
        assert _quantize(tiny_model_dir, text_file, out) == 2  # interrupted after one block
    capsys.readouterr()
    monkeypatch.setattr("llmbin.models.open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert _quantize(tiny_model_dir, text_file, out, "--seed", "3") == 2
    assert (f"{out}.partial holds blocks of another run (calibration.seed: 0 then, 3 now); rerun with the same model "
            "and options to resume") in _one_line_error(capsys)


def test_a_refused_resume_shows_where_two_long_values_differ(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    """The second probe: two calibration files in one deep folder were both shown as "/work/runs/s7/pr…",
    which reads as the same value; the message now starts shortly before they differ."""
    from tests.conftest import interrupt_after_first_block

    deep = tmp_path / "a-long-folder-name" / "and-another-one"
    deep.mkdir(parents=True)
    first, second = deep / "calibration-one.txt", deep / "calibration-two.txt"
    for path in (first, second):
        path.write_text(text_file.read_text())
    out = tmp_path / "ckpt"
    with interrupt_after_first_block(monkeypatch):
        assert _quantize(tiny_model_dir, first, out) == 2
    capsys.readouterr()
    assert _quantize(tiny_model_dir, second, out) == 2
    assert ('another run (calibration.data: …libration-one.txt" then, …libration-two.txt" now); rerun'
            in _one_line_error(capsys))


@pytest.mark.parametrize("where", ["ckpt", "ckpt/report.json", "ckpt.partial/report.json"])
def test_a_report_where_the_checkpoint_goes_is_refused_before_the_work(tiny_model_dir, text_file, tmp_path, capsys,
                                                                       no_model_load, where):
    """The second probe: --json equal to --out quantized the whole model, then failed with an
    IsADirectoryError traceback (exit 1) when the report was renamed onto the new checkpoint."""
    (tmp_path / "ckpt.partial").mkdir()  # so that the report's folder exists: only the overlap is wrong
    out = tmp_path / "ckpt"
    assert _quantize(tiny_model_dir, text_file, out, "--json", str(tmp_path / where)) == 2
    assert _one_line_error(capsys) == (f"llmbin: error: --json {tmp_path / where} lies where --out {out} is written; "
                                       f"give a path outside it, such as {out}.json")


def test_an_output_that_is_a_file_is_called_a_file(tiny_model_dir, text_file, tmp_path, capsys, no_model_load):
    (tmp_path / "ckpt").write_text("x")
    assert _quantize(tiny_model_dir, text_file, tmp_path / "ckpt") == 2
    assert _one_line_error(capsys) == (f"llmbin: error: output directory {tmp_path}/ckpt already exists (as a file); "
                                       "choose another --out or remove it")


def test_an_activation_folder_that_is_a_file_is_called_a_file(tiny_model_dir, text_file, tmp_path, capsys):
    (tmp_path / "acts").write_text("x")
    assert _quantize(tiny_model_dir, text_file, tmp_path / "ckpt", "--offload-activations", str(tmp_path / "acts")) == 2
    assert _one_line_error(capsys) == (f"llmbin: error: --offload-activations {tmp_path}/acts is a file, not a folder; "
                                       "give a folder (it is created if missing)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]
