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
