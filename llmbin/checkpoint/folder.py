"""The output folder of a quantization run: claimed before any heavy work, locked against a second
run, and cleared of what killed runs left behind.

``OUT`` appears only complete (``checkpoint.save`` writes ``.OUT.tmp-PID`` and renames it);
``OUT.partial/`` holds the finished blocks of an unfinished run and a lock file. A second process
asking for the same ``OUT`` fails at once instead of racing the first.

The lock file also holds a record of the run that holds it (pid, start, state). A run that ends
in any way Python sees marks itself ended; one killed with SIGKILL (as the kernel's out-of-memory
killer does) cannot, so the next run on the same ``OUT`` finds it still "running" with its process
gone, and says so, with the memory options to change.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import LlmbinError

LOCK_FILE = "lock"
_held: dict[Path, object] = {}  # work folder -> open lock file of this process


def work_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def temporary_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def claim_output(out: str | os.PathLike) -> Path:
    """Check that ``out`` can be written, lock ``OUT.partial/`` for this process and remove what
    killed runs left; returns the work folder. Idempotent within a process."""
    out = Path(out)
    work = work_dir(out)
    if out.exists():
        _remove_if_unlocked(work)  # a run killed after its checkpoint was complete, before it cleaned up
        remove_stale_temporaries(out)
        raise LlmbinError(f"output directory {out} already exists{'' if out.is_dir() else ' (as a file)'}; choose "
                          "another --out or remove it")
    if work in _held:
        return work
    try:
        work.mkdir(parents=True, exist_ok=True)
        lock = open(work / LOCK_FILE, "a")
    except OSError as exc:
        raise LlmbinError(f"cannot write {work} ({exc.strerror or exc}); choose an --out in a folder you can write") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise LlmbinError(f"another llmbin run is writing {out} (it holds {work / LOCK_FILE}); wait for it to "
                              "finish or choose another --out") from None
        raise LlmbinError(f"cannot lock {work / LOCK_FILE} ({exc.strerror}); choose an --out on a local disk") from None
    _held[work] = lock
    _report_a_silent_death(out, work)
    _write_record(lock, {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "oom_kills": oom_kills(),
                         "state": "running"})
    remove_stale_temporaries(out)
    return work


def _write_record(lock, record: dict) -> None:
    lock.truncate(0)  # append mode: the write lands at the (new) end, which is the start
    lock.write(json.dumps(record) + "\n")
    lock.flush()


def _report_a_silent_death(out: Path, work: Path) -> None:
    """Say so when the last run on ``out`` was killed without a word (its record still says running)."""
    try:
        with open(work / LOCK_FILE) as f:
            last = json.loads(f.read() or "{}")
        pid = int(last.get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return  # no record (a lock file from before records existed), or not ours to read
    if last.get("state") != "running" or not pid or pid == os.getpid() or _alive(pid):
        return
    cause = silent_death_cause(last.get("oom_kills"), oom_kills())
    print(f"llmbin: the last run on {out} (pid {pid}, started {last.get('started')}) died without a word: {cause}. "
          f"Its finished blocks in {work} are resumed; if memory was short, add --offload-activations DIR, or use "
          "fewer --nsamples or a smaller --seqlen", file=sys.stderr, flush=True)


def silent_death_cause(then, now) -> str:
    """Why a run died without a word, from the cgroup's oom_kill count when it started and now."""
    if isinstance(then, int) and now is not None and now > then:
        return f"the kernel's out-of-memory killer did it (this cgroup's oom_kill count went from {then} to {now})"
    return "a SIGKILL (what the kernel's out-of-memory killer sends; dmesg shows its kills) or a crash did it"


_WATCHER = """
import sys, time
said = sys.stdin.read()  # until this process's parent ends, whichever way: its end closes the pipe
if said != "ended":
    time.sleep(0.2)  # the kernel counts the kill a moment after the pipe closes
    sys.path[:0] = [%r]
    from llmbin.checkpoint.folder import oom_kills, silent_death_cause
    cause = silent_death_cause(%r, oom_kills())
    print(f"llmbin: quantizing {%r} died without a word: {cause}. Its finished blocks, if any, are kept for the rerun; "
          "if memory was short, rerun with --offload-activations DIR, or fewer --nsamples or a smaller --seqlen",
          file=sys.stderr, flush=True)
"""


class DeathWatch:
    """A small watcher process that says so on stderr, at once, if this process dies without a word
    (a SIGKILL, what the kernel's out-of-memory killer sends, or a crash; SIGTERM and SIGHUP are
    handled by the CLI). It waits for this process to close
    a pipe; :meth:`ended`, called when the work ends in any way Python sees, writes "ended" first.
    Its own session, so a Ctrl-C in the terminal reaches only the run."""

    def __init__(self, out: str | os.PathLike):
        import subprocess

        package_root = str(Path(__file__).resolve().parents[2])
        try:
            self.process = subprocess.Popen([sys.executable, "-c", _WATCHER % (package_root, oom_kills(), str(out))],
                                            stdin=subprocess.PIPE, text=True, start_new_session=True)
        except OSError:  # no interpreter to start (an embedded Python): the next run still reports it
            self.process = None

    def ended(self) -> None:
        import subprocess

        if self.process is None:
            return
        try:
            self.process.stdin.write("ended")
            self.process.stdin.close()
            self.process.wait(timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass


def oom_kills() -> int | None:
    """How many processes of this process's cgroup the out-of-memory killer has killed (cgroup v2's
    ``memory.events``, or v1's ``memory.oom_control``), or None where that cannot be read."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0":
                candidates += [Path("/sys/fs/cgroup", path.lstrip("/"), "memory.events"), Path("/sys/fs/cgroup/memory.events")]
            elif "memory" in controllers.split(","):
                candidates += [Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.oom_control"),
                               Path("/sys/fs/cgroup/memory/memory.oom_control")]
    except (OSError, ValueError):
        return None
    for candidate in candidates:
        try:
            for line in candidate.read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return None


def release_output(out: str | os.PathLike, remove: bool) -> None:
    """Unlock ``OUT.partial/`` (and delete it with ``remove``, once ``OUT`` is complete)."""
    work = work_dir(out)
    lock = _held.pop(work, None)
    if remove:
        shutil.rmtree(work, ignore_errors=True)
    if lock is not None:
        if not remove:
            _write_record(lock, {"pid": os.getpid(), "state": "ended"})
        lock.close()


def _remove_if_unlocked(work: Path) -> None:
    if not (work / LOCK_FILE).is_file() or work in _held:
        return
    with open(work / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a live run holds it
        shutil.rmtree(work, ignore_errors=True)


def remove_stale_temporaries(out: Path) -> None:
    """Delete ``.OUT.tmp-PID`` folders whose process is gone (a run killed while saving)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_error(exc: BaseException, target: str | os.PathLike) -> LlmbinError:
    """The one-line error for a failed write (``OSError``, or safetensors' own error type)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        return LlmbinError(f"no space left on the device while writing {target}; free some space or choose an --out "
                           "on another disk, then rerun (finished blocks are kept)")
    if getattr(exc, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM):
        return LlmbinError(f"cannot write {target} ({exc.strerror}); choose an --out in a folder you can write")
    return LlmbinError(f"writing {target} failed ({text}); check the disk and rerun (finished blocks are kept)")
