"""A perplexity run's per-window NLLs on disk, so that a long evaluation resumes where it stopped.

A 1.5B model takes about 24 s per 2048-token window on a 2-core CPU, so the full wikitext-2 test
is about an hour: longer than a session may last. The log is JSON lines: a header naming what
was evaluated (model, dtype, window length, and a digest of the token ids, which covers the text
and the tokenizer), then one ``{"window": i, "nll": x}`` per finished window, flushed and fsynced.

A resume never mixes two settings: a header that differs is refused, and window 0 is always run
again and must give the logged NLL (to a relative 1e-5, which a thread-count change stays within
and a different model does not), so a log written for other weights under the same path is
refused too. JSON only: nothing in the file is executed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from ..errors import LlmbinError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

FORMAT = 1
FIRST_WINDOW_RTOL = 1e-5


def token_digest(token_ids: torch.Tensor) -> str:
    return hashlib.sha256(token_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class WindowLog:
    """``done`` maps window index to NLL; :meth:`append` records one more; :meth:`check_first`
    compares a recomputed window 0 with the logged one."""

    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = Path(path)
        self.header = {"format": FORMAT, **header}
        self.done: dict[int, float] = {}
        if self.path.is_dir():
            raise LlmbinError(f"perplexity log {self.path} is a folder; give a file path (or another --cache prefix)")
        if not self.path.parent.is_dir():
            raise LlmbinError(f"perplexity log {self.path}: folder {self.path.parent} does not exist; create it first")
        self._lock = self._claim()
        if self.path.exists():
            self._read()
        else:
            self._rewrite()

    def _claim(self):
        """One evaluation per log: two at once each rewrote the log under one temporary name (a
        traceback when the second rename found it gone) and dropped each other's new windows."""
        handle = open(self.path.with_name(self.path.name + ".lock"), "a")
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise LlmbinError(f"another llmbin eval is writing {self.path}; wait for it to finish or choose another "
                                  "--cache prefix") from None
        return handle

    def _read(self) -> None:
        fix = f"delete {self.path} or choose another --cache prefix"
        lines = self.path.read_text().splitlines()
        try:
            logged = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            logged = None
        if not isinstance(logged, dict) or logged.get("format") != FORMAT:
            raise LlmbinError(f"{self.path} is not an llmbin perplexity log; {fix}")
        if logged != self.header:
            diff = ", ".join(f"{k}: {logged.get(k)!r} there, {v!r} now" for k, v in self.header.items() if logged.get(k) != v)
            raise LlmbinError(f"{self.path} was written for another evaluation ({diff}); {fix}")
        for n, line in enumerate(lines[1:], 2):
            try:
                row = json.loads(line)
                self.done[int(row["window"])] = float(row["nll"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if n != len(lines):  # only the last line may be torn, by a kill mid-write
                    raise LlmbinError(f"{self.path} line {n} is not a window record; {fix}") from None
        self._rewrite()  # drops a torn last line, so that appends start on a clean line

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        rows = [json.dumps(self.header)] + [json.dumps({"window": i, "nll": x}) for i, x in sorted(self.done.items())]
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, self.path)

    def append(self, window: int, nll: float) -> None:
        self.done[window] = nll
        with open(self.path, "a") as f:
            f.write(json.dumps({"window": window, "nll": nll}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def check_first(self, nll: float) -> None:
        logged = self.done[0]
        if not math.isclose(nll, logged, rel_tol=FIRST_WINDOW_RTOL):
            raise LlmbinError(f"{self.path}: window 0 now gives NLL {nll!r}, the log has {logged!r}, so the log was "
                              "written by other weights or settings; delete it or choose another --cache prefix")
