"""The hub path (for online users) is exercised with a stand-in for ``datasets.load_dataset``."""
import pytest

import datasets
from llmbin.data.text import dataset_rows
from llmbin.errors import LlmbinError


@pytest.fixture
def no_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMBIN_DATA", str(tmp_path))


@pytest.mark.parametrize("name,purpose,expected", [
    ("wikitext2", "calibration", (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})),
    ("wikitext2", "test", (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})),
    ("ptb", "test", (("ptb_text_only", "penn_treebank"), {"split": "test"})),
    ("c4", "calibration", (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
                                             "split": "train"})),
])
def test_hub_requests(no_local_copy, monkeypatch, name, purpose, expected):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or {"text": ["t"], "sentence": ["s"]})
    assert dataset_rows(name, purpose) in (["t"], ["s"])
    assert calls == [expected]


def test_unreachable_hub_gets_a_clear_error(no_local_copy, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LlmbinError, match="go online, or pass a local file"):
        dataset_rows("wikitext2", "test")


def _parquet(path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": column}), path)
    return path


@pytest.mark.parametrize("name,write,message", [
    ("latin1.txt", lambda p: p.write_bytes("café crème\n".encode("latin-1")),
     r"is not UTF-8 text \(byte 3 cannot be decoded\); convert it to UTF-8"),
    ("binary.txt", lambda p: p.write_bytes(bytes(range(256))), r"is not UTF-8 text"),
    ("number.jsonl", lambda p: p.write_text('{"text": "fine"}\n{"text": 42}\n'),
     r"number.jsonl:2: 'text' is a int, not a string; fix that line"),
    ("nulls.parquet", lambda p: _parquet(p, pa_nulls()), r"holds no text \(every row is empty or null\)"),
    ("blank.txt", lambda p: p.write_text("\n\n  \n"), r"holds no text"),
    ("ints.parquet", lambda p: _parquet(p, [1, 2, 3]), r"'text' column holds int values, not strings"),
    ("broken.parquet", lambda p: p.write_bytes(b"PAR1 not really"), r"is not a readable parquet file"),
])
def test_unusable_data_files_get_a_one_line_error(tmp_path, name, write, message):
    from llmbin.data.text import read_text_file

    path = tmp_path / name
    write(path)
    with pytest.raises(LlmbinError, match=message) as info:
        read_text_file(path)
    assert "\n" not in str(info.value)


def pa_nulls():
    import pyarrow as pa

    return pa.array([None, None, None], type=pa.string())
