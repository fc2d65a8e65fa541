"""The hub path (for online users) is exercised with a stand-in for ``datasets.load_dataset``."""
import datasets
import pytest

from llmbin.data.text import dataset_rows
from llmbin.errors import LlmbinError


@pytest.fixture
def no_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMBIN_DATA", str(tmp_path))


@pytest.fixture
def hub_answers(monkeypatch):
    """The hub answers the probe (as for an online user), whatever this machine's network."""
    import llmbin.hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(llmbin.hub, "hub_reachable", lambda endpoint: True)


@pytest.mark.parametrize("name,purpose,expected", [
    ("wikitext2", "calibration", (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})),
    ("wikitext2", "test", (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})),
    ("ptb", "test", (("ptb_text_only", "penn_treebank"), {"split": "test"})),
    ("c4", "calibration", (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
                                             "split": "train"})),
])
def test_hub_requests(no_local_copy, hub_answers, monkeypatch, name, purpose, expected):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or {"text": ["t"], "sentence": ["s"]})
    assert dataset_rows(name, purpose) in (["t"], ["s"])
    assert calls == [expected]


def test_unreachable_hub_gets_a_clear_error(no_local_copy, hub_answers, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LlmbinError) as info:
        dataset_rows("wikitext2", "test")
    assert str(info.value) == ("could not load wikitext2 (test) from the Hugging Face hub (ConnectionError); go online, "
                               "or pass a local file (--eval-data PATH) or set LLMBIN_DATA to the folder of its local copy")


@pytest.mark.parametrize("how", ["environment", "probe"])
def test_offline_only_the_cache_is_tried_and_the_error_names_a_local_file(no_local_copy, monkeypatch, how):
    """Offline, datasets would retry the hub for half a minute: it is put in offline mode (its cache only)."""
    import huggingface_hub.constants

    import llmbin.hub

    if how == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(llmbin.hub, "hub_reachable", lambda endpoint: False)
    modes = []

    def cache_only(*args, **kwargs):
        modes.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        raise FileNotFoundError("Dataset allenai/c4 is not cached")

    monkeypatch.setattr(datasets, "load_dataset", cache_only)
    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    with pytest.raises(LlmbinError) as info:
        dataset_rows("c4", "calibration")
    assert str(info.value) == ("c4 cannot be downloaded: the Hugging Face hub does not answer (offline) and no cached "
                               "copy was found; give a local .parquet/.jsonl/.txt file (--calib-data PATH)")
    after = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    assert modes == [(True, True)] and after == before  # offline only for that call


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
