import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmbin.data.calibration import calibration_windows, sample_windows
from llmbin.data.text import read_text_file, resolve_text
from llmbin.errors import LlmbinError


def test_windows_are_seeded_and_deterministic():
    ids = torch.arange(10_000)
    a, b = sample_windows(ids, 8, 128, seed=0), sample_windows(ids, 8, 128, seed=0)
    assert a.shape == (8, 128) and torch.equal(a, b)
    assert not torch.equal(a, sample_windows(ids, 8, 128, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 127, dtype=torch.long))  # contiguous windows


def test_text_shorter_than_one_window_is_a_clear_error():
    with pytest.raises(LlmbinError, match="shorter than one window of 2048"):
        sample_windows(torch.arange(100), 4, 2048, seed=0)


def test_exactly_the_tokens_asked_for_are_enough():
    assert torch.equal(sample_windows(torch.arange(64), 1, 64, 0), torch.arange(64)[None])
    assert sample_windows(torch.arange(192), 3, 64, 0).shape == (3, 64)


def test_text_shorter_than_the_windows_asked_for_is_refused():
    """Issue 35's probe: 103 tokens with --nsamples 8 --seqlen 64 were accepted without a word, the
    windows overlapping while the run recorded 8 of them."""
    with pytest.raises(LlmbinError, match=r"^calibration text has 103 tokens, fewer than the 8 x 64 = 512 asked "
                                          r"\(--nsamples x --seqlen\); use more text, or at most --nsamples 1$"):
        sample_windows(torch.arange(103), 8, 64, seed=0)
    with pytest.raises(LlmbinError, match="fewer than the 3 x 64 = 192 asked"):
        sample_windows(torch.arange(191), 3, 64, seed=0)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "txt"])
def test_local_file_formats(tmp_path, fmt):
    rows = ["first line", "", "second line"]
    path = tmp_path / f"data.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": rows}), path)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": r}) for r in rows) + "\n")
    else:
        path.write_text("\n".join(rows))
    assert read_text_file(path) == rows
    assert resolve_text(str(path), "calibration") == "first line\n\n\n\nsecond line"


@pytest.mark.parametrize("content,name,match", [
    (None, "missing.txt", "does not exist"),
    ("x", "data.csv", "unsupported data file type"),
    ('{"body": 1}\n', "data.jsonl", "'text' field"),
])
def test_bad_data_files(tmp_path, content, name, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(LlmbinError, match=match):
        read_text_file(path)


def test_a_folder_a_dangling_link_or_a_loop_as_data_is_named_as_such(tmp_path):
    """Issue 35's probe: a folder passed as --calib-data was reported as "does not exist"."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    for path, problem in ((tmp_path, "is a folder"), (tmp_path / "loop", "is a loop of symbolic links"),
                          (tmp_path / "dangling.txt", f"is a link to {tmp_path}/gone.txt, which does not exist")):
        with pytest.raises(LlmbinError) as info:
            resolve_text(str(path), "calibration")
        assert str(info.value) == f"data file {path} {problem}; pass an existing .parquet, .jsonl or .txt file"


def test_a_pipe_or_a_device_as_data_is_refused_before_it_is_read(tmp_path):
    """The second probe: a named pipe called calib.txt blocked the run forever, and a link to /dev/zero
    read until the out-of-memory killer came (40 s, exit 137)."""
    import os

    os.mkfifo(tmp_path / "calib.txt")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    for path in (tmp_path / "calib.txt", tmp_path / "zero.txt"):
        with pytest.raises(LlmbinError) as info:
            resolve_text(str(path), "calibration")
        assert str(info.value) == (f"data file {path} is not a regular file (a pipe, socket or device); pass an existing "
                                   ".parquet, .jsonl or .txt file")


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(LlmbinError, match="no 'text' column"):
        read_text_file(tmp_path / "d.parquet")


def test_unknown_data_set_name():
    with pytest.raises(LlmbinError, match="wikitext2, c4, ptb"):
        resolve_text("wikitext103", "calibration")


def test_calibration_from_a_tokenized_file(tokenizer, text_file):
    windows = calibration_windows(tokenizer, str(text_file), nsamples=3, seqlen=32, seed=0)
    assert windows.shape == (3, 32) and windows.dtype == torch.long


def test_local_wikitext_copy_is_used_when_present(tmp_path, monkeypatch):
    folder = tmp_path / "wikitext" / "wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a", "b"]}), folder / "test-00000-of-00001.parquet")
    monkeypatch.setenv("LLMBIN_DATA", str(tmp_path))
    assert resolve_text("wikitext2", "test") == "a\n\nb"


def test_document_windows_come_from_long_enough_documents(tokenizer):
    from llmbin.data.calibration import sample_document_windows

    docs = ["the model", "the binary weight scale " * 40, "sign"]
    a = sample_document_windows(tokenizer, docs, 3, 16, seed=0)
    assert a.shape == (3, 16) and torch.equal(a, sample_document_windows(tokenizer, docs, 3, 16, seed=0))
    with pytest.raises(LlmbinError, match="longer than 4096 tokens"):
        sample_document_windows(tokenizer, docs, 2, 4096, seed=0, max_tries=50)
