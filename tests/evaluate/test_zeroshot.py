"""``llmbin eval --tasks``: lm-eval on a tiny random model and a packed checkpoint, offline."""
import json
import os

import pytest

from llmbin.cli import main
from llmbin.errors import LlmbinError
from llmbin.evaluate.zeroshot import OFFLINE_TASKS, resolve_task_data, zero_shot
from tests.conftest import tiny_model


def test_every_offline_task_runs_on_a_tiny_model(tokenizer):
    report = zero_shot(tiny_model("llama"), tokenizer, list(OFFLINE_TASKS), limit=3, batch_size=4)
    assert set(report["tasks"]) == set(OFFLINE_TASKS) and report["limit"] == 3 and report["task_data"]
    for task, metrics in report["tasks"].items():
        assert 0 <= metrics["acc"] <= 1 and metrics["acc"] * 3 == round(metrics["acc"] * 3)  # 3 examples each
        assert ("acc_norm" in metrics) == (task != "winogrande")
    assert report["average"] == pytest.approx(sum(m["acc"] for m in report["tasks"].values()) / 5)


def test_cli_evaluates_a_saved_checkpoint_and_writes_the_tasks(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "ckpt"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "pb-llm", "--calib-data", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--no-progress",
                 "--eval-tasks", "piqa,winogrande", "--limit", "3", "--json", str(tmp_path / "q.json")]) == 0
    assert main(["eval", str(out), "--tasks", "piqa,winogrande", "--limit", "3", "--json", str(tmp_path / "z.json"),
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "z.json").read_text())
    assert set(report["tasks"]) == {"piqa", "winogrande"} and "ppl" not in report  # --tasks alone: no perplexity
    assert report["bits_per_weight"] > 1 and set(report["tasks"]["piqa"]) == {"acc", "acc_norm"}
    # quantize --eval-tasks scores the saved checkpoint, reloaded: the same numbers as a later llmbin eval
    assert json.loads((tmp_path / "q.json").read_text())["tasks"] == report["tasks"]


def test_quantize_checks_its_tasks_before_quantizing(tiny_model_dir, text_file, tmp_path, capsys):
    base = ["quantize", "--model", str(tiny_model_dir), "--method", "pb-llm", "--calib-data", str(text_file),
            "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "ckpt"), "--no-progress"]
    assert main(base + ["--eval-tasks", "piqa,hellaswg"]) == 2
    assert "unknown task hellaswg for local task data; available: piqa" in capsys.readouterr().err
    assert main(base + ["--limit", "3"]) == 2
    assert "--limit and --task-data apply to zero-shot tasks; add --eval-tasks" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # failed before any work: no checkpoint, no partial folder


def test_a_bad_task_name_lists_the_available_tasks(tokenizer):
    with pytest.raises(LlmbinError, match="unknown task hellaswg for local task data; available: piqa, arc_easy"):
        zero_shot(tiny_model("llama"), tokenizer, ["hellaswg"], limit=1)


def test_a_missing_task_data_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(LlmbinError, match="--task-data .*nowhere is not a folder; it should hold piqa/, arc/"):
        resolve_task_data(tmp_path / "nowhere")
    assert main(["eval", "--model", "x", "--limit", "3"]) == 2
    assert "--limit and --task-data apply to zero-shot tasks; add --tasks" in capsys.readouterr().err


def test_a_folder_without_a_task_names_the_missing_files(tokenizer, tmp_path):
    (tmp_path / "piqa").mkdir()
    with pytest.raises(LlmbinError, match="lacks piqa/valid.jsonl, piqa/valid-labels.lst; it needs the layout"):
        zero_shot(tiny_model("llama"), tokenizer, ["piqa"], limit=1, task_data=tmp_path)


def test_a_malformed_task_file_is_a_clear_error(tokenizer, tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(LlmbinError, match="valid-labels.lst has 2 labels for 1 examples"):
        zero_shot(tiny_model("llama"), tokenizer, ["piqa"], limit=1, task_data=tmp_path)


@pytest.mark.parametrize("make,problem", [
    (lambda f: (f.write_bytes(b""), f.chmod(0o666)), "is writable by other users"),
    (lambda f: (f.with_name("elsewhere.db").write_bytes(b""), f.symlink_to(f.with_name("elsewhere.db"))), "is a link"),
    (lambda f: f.mkdir(), "is not a regular file"),
])
def test_cache_files_others_could_have_written_are_refused(tmp_path, make, problem):
    """lm-eval's SqliteDict unpickles: a cache file someone else could write would run their code."""
    from llmbin.evaluate.zeroshot import check_cache

    make(tmp_path / "scores_rank0.db")
    with pytest.raises(LlmbinError, match=rf"^cache file {tmp_path}/scores_rank0.db {problem}; lm-eval's cache "
                                          "unpickles its contents"):
        check_cache(tmp_path / "scores")


def test_a_cache_file_of_another_user_is_refused(tmp_path, monkeypatch):
    from llmbin.evaluate.zeroshot import check_cache

    (tmp_path / "scores_rank0.db").write_bytes(b"")
    check_cache(tmp_path / "scores")  # ours: fine
    monkeypatch.setattr("os.getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(LlmbinError, match=r"belongs to another user \(uid \d+\)"):
        check_cache(tmp_path / "scores")


def test_a_cache_in_a_folder_everyone_can_write_is_refused(tmp_path):
    from llmbin.evaluate.zeroshot import check_cache

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(LlmbinError, match="is writable by every user"):
        check_cache(shared / "scores")
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot replace our files
    check_cache(shared / "scores")


def test_the_cli_checks_the_cache_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "c_rank0.db").write_bytes(b"")
    (tmp_path / "c_rank0.db").chmod(0o666)
    assert main(["eval", str(tmp_path / "no-such-checkpoint"), "--tasks", "piqa", "--cache", str(tmp_path / "c")]) == 2
    assert "is writable by other users" in capsys.readouterr().err
