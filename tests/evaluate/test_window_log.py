"""A perplexity log resumes a long evaluation, and never mixes two models or two settings."""
import json
from pathlib import Path

import pytest
import torch

from llmbin.cli import main
from llmbin.errors import LlmbinError
from llmbin.evaluate.perplexity import ppl_of, window_nlls
from tests.conftest import tiny_model

IDS = torch.randint(0, 300, (1200,), generator=torch.Generator().manual_seed(0))


class CountingModel(torch.nn.Module):
    """The model, counting forward calls (the windows really run)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, 0

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_an_interrupted_run_resumes_with_the_same_numbers(tmp_path):
    log = tmp_path / "run.windows.jsonl"
    expected = window_nlls(tiny_model(), IDS, seqlen=100, progress=False)
    first = window_nlls(tiny_model(), IDS, seqlen=100, max_windows=4, progress=False, log=log, model_name="tiny")
    assert first == expected[:4]
    model = CountingModel(tiny_model())
    assert window_nlls(model, IDS, seqlen=100, progress=False, log=log, model_name="tiny") == expected
    assert model.calls == 1 + len(expected) - 4  # window 0 again (the check), then only the missing ones
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows[0]["seqlen"] == 100 and [r["window"] for r in rows[1:]] == list(range(len(expected)))


def test_a_log_written_by_other_weights_is_refused(tmp_path):
    log = tmp_path / "run.windows.jsonl"
    window_nlls(tiny_model(seed=0), IDS, seqlen=100, max_windows=3, progress=False, log=log, model_name="m")
    with pytest.raises(LlmbinError, match="window 0 now gives NLL .* so the log was written by other weights"):
        window_nlls(tiny_model(seed=1), IDS, seqlen=100, max_windows=6, progress=False, log=log, model_name="m")


def test_a_log_of_other_settings_names_the_difference(tmp_path):
    log = tmp_path / "run.windows.jsonl"
    window_nlls(tiny_model(), IDS, seqlen=100, max_windows=2, progress=False, log=log, model_name="m")
    with pytest.raises(LlmbinError, match=r"written for another evaluation \(seqlen: 100 there, 200 now\)"):
        window_nlls(tiny_model(), IDS, seqlen=200, max_windows=2, progress=False, log=log, model_name="m")
    with pytest.raises(LlmbinError, match=r"tokens_sha256: '[0-9a-f]+' there, '[0-9a-f]+' now"):
        window_nlls(tiny_model(), IDS.flip(0), seqlen=100, max_windows=2, progress=False, log=log, model_name="m")
    with pytest.raises(LlmbinError, match="model: 'm' there, 'other' now"):
        window_nlls(tiny_model(), IDS, seqlen=100, max_windows=2, progress=False, log=log, model_name="other")


def test_a_torn_last_line_is_dropped_and_a_torn_middle_line_refused(tmp_path):
    log = tmp_path / "run.windows.jsonl"
    expected = window_nlls(tiny_model(), IDS, seqlen=100, max_windows=5, progress=False)
    window_nlls(tiny_model(), IDS, seqlen=100, max_windows=3, progress=False, log=log)
    log.write_text(log.read_text() + '{"window": 3, "nl')  # killed mid-write
    assert window_nlls(tiny_model(), IDS, seqlen=100, max_windows=5, progress=False, log=log) == expected
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + ["garbage"] + lines[2:]) + "\n")
    with pytest.raises(LlmbinError, match="line 3 is not a window record; delete"):
        window_nlls(tiny_model(), IDS, seqlen=100, max_windows=5, progress=False, log=log)


def test_a_file_that_is_not_a_log_is_refused(tmp_path):
    other = tmp_path / "notes.jsonl"
    other.write_text("hello\n")
    with pytest.raises(LlmbinError, match="is not an llmbin perplexity log; delete"):
        window_nlls(tiny_model(), IDS, seqlen=100, progress=False, log=other)
    with pytest.raises(LlmbinError, match="is a folder; give a file path"):
        window_nlls(tiny_model(), IDS, seqlen=100, progress=False, log=tmp_path)


def test_llmbin_eval_cache_resumes_perplexity_and_reports_each_window(tiny_model_dir, text_file, tmp_path):
    args = ["eval", "--model", str(tiny_model_dir), "--eval-data", str(text_file), "--seqlen", "32",
            "--cache", str(tmp_path / "run"), "--no-progress"]
    assert main(args + ["--max-windows", "2", "--json", str(tmp_path / "a.json")]) == 0
    assert main(args + ["--max-windows", "4", "--json", str(tmp_path / "b.json")]) == 0
    assert main(["eval", "--model", str(tiny_model_dir), "--eval-data", str(text_file), "--seqlen", "32",
                 "--max-windows", "4", "--no-progress", "--json", str(tmp_path / "c.json")]) == 0
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc")
    assert b["window_nll"][:2] == a["window_nll"] and b["window_nll"] == c["window_nll"]
    assert b["ppl"]["wikitext2"] == c["ppl"]["wikitext2"] == ppl_of(c["window_nll"])
    assert (tmp_path / "run.wikitext2-32.windows.jsonl").is_file()


def test_a_cache_prefix_may_name_a_folder_and_its_log_goes_beside_it(tiny_model_dir, text_file, tmp_path):
    # the protocol scripts pass the checkpoint's folder as the prefix of its evaluation's logs
    folder = tmp_path / "checkpoint"  # a folder of this test's own: the model fixture is shared by the session
    folder.mkdir()
    args = ["eval", "--model", str(tiny_model_dir), "--eval-data", str(text_file), "--seqlen", "32",
            "--max-windows", "2", "--cache", str(folder), "--no-progress"]
    assert main(args) == 0
    assert Path(f"{folder}.wikitext2-32.windows.jsonl").is_file()


def test_a_cache_in_a_missing_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    # the model does not exist either: the cache's folder is checked first, before anything loads
    assert main(["eval", "--model", "no-such-model-folder", "--cache", str(tmp_path / "nowhere" / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--cache {tmp_path / 'nowhere' / 'run'}: folder {tmp_path / 'nowhere'} does not exist; create it first" in err


def test_a_second_evaluation_on_the_same_log_is_refused_while_the_first_runs(tmp_path):
    """The second probe: two evaluations with one --cache prefix each rewrote the log under one
    temporary name (a traceback when the second rename found it gone) and dropped each other's windows."""
    import subprocess
    import sys

    from llmbin.evaluate.window_log import WindowLog

    path = tmp_path / "log.windows.jsonl"
    code = ("import sys, time; from llmbin.evaluate.window_log import WindowLog; "
            f"log = WindowLog({str(path)!r}, {{'model': 'm'}}); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LlmbinError) as info:
            WindowLog(path, {"model": "m"})
        assert str(info.value) == (f"another llmbin eval is writing {path}; wait for it to finish or choose another "
                                   "--cache prefix")
    finally:
        holder.communicate("")
    WindowLog(path, {"model": "m"}).append(0, 1.5)  # its end releases the log
    assert WindowLog(path, {"model": "m"}).done == {0: 1.5}
