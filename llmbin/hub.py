"""Whether the Hugging Face hub can be reached, asked before anything would wait on it: offline,
``huggingface_hub`` and ``datasets`` retry for half a minute before they fail, and then report a
network error where the likely fix is a local path."""
from __future__ import annotations

import contextlib
import functools
import os
import ssl
import sys
import threading
import urllib.error
import urllib.request

PROBE_SECONDS = 2.0
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment variable


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` says so (the environment, or
    huggingface_hub's setting if it is loaded), or when the hub endpoint does not answer within
    about 2 s (asked once per process)."""
    if any(os.environ.get(name, "").upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and getattr(constants, "HF_HUB_OFFLINE", False):
        return True
    return not hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.cache
def hub_reachable(endpoint: str) -> bool:
    """Whether ``endpoint`` answers an HTTP request (any status) within ``PROBE_SECONDS``. The
    request runs in a thread so that a slow name lookup, which ignores socket timeouts, is bounded
    too; urllib honours the proxy variables as huggingface_hub does."""
    answer = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_SECONDS).close()
            answer.append(True)
        except urllib.error.HTTPError:  # it answered, if only with an error status
            answer.append(True)
        except urllib.error.URLError as exc:  # a TLS failure still means the network is there
            answer.append(isinstance(exc.reason, ssl.SSLError))
        except (OSError, ValueError):
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return bool(answer and answer[0])


@contextlib.contextmanager
def offline_mode():
    """huggingface_hub and datasets in offline mode for the duration: they use their caches and
    fail at once instead of retrying a hub that does not answer."""
    import datasets.config
    import huggingface_hub.constants

    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
