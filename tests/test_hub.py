"""The hub probe: the offline settings are honoured, and a hub that does not answer is found within seconds."""
import time
import urllib.error
import urllib.request

import pytest

from llmbin import hub


@pytest.fixture(autouse=True)
def fresh_probe():
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


@pytest.mark.parametrize("name,value,offline", [("HF_HUB_OFFLINE", "1", True), ("TRANSFORMERS_OFFLINE", "yes", True),
                                                ("HF_HUB_OFFLINE", "0", False)])
def test_the_offline_variables_are_honoured_without_a_probe(monkeypatch, name, value, offline):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint: True)
    assert hub.hub_offline() is offline


def _answer(outcome):
    def urlopen(request, timeout):
        assert request.get_method() == "HEAD" and timeout == hub.PROBE_SECONDS
        if outcome == "hang":
            time.sleep(hub.PROBE_SECONDS + 3)
        if isinstance(outcome, Exception):
            raise outcome
        return type("Response", (), {"close": lambda self: None})()

    return urlopen


@pytest.mark.parametrize("outcome,reachable", [
    ("ok", True),
    (urllib.error.HTTPError("https://hub", 503, "busy", {}, None), True),  # it answered
    (urllib.error.URLError(OSError(-2, "Name or service not known")), False),
    (TimeoutError("timed out"), False),
])
def test_the_probe(monkeypatch, outcome, reachable):
    monkeypatch.setattr(urllib.request, "urlopen", _answer(outcome))
    assert hub.hub_reachable("https://hub.example") is reachable


def test_a_probe_that_hangs_is_bounded(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _answer("hang"))
    start = time.perf_counter()
    assert hub.hub_reachable("https://hub.example") is False
    assert time.perf_counter() - start < hub.PROBE_SECONDS + 1.5
