"""The C++ CPU kernel, compiled just in time on first use and cached per source, torch and Python
version under ``$LLMBIN_KERNEL_CACHE`` (default ``~/.cache/llmbin/kernels``); a source change (an
entry point's arguments included) or a torch upgrade builds a fresh copy instead of loading a
stale binary, and a loaded build's plan fields are checked against ``KernelPlan``. A cache that
another user could have written is refused (``secure_cache``). Without a
compiler the build fails once, with a one-line warning, and callers use the plain-torch
reference path."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import stat
import sys
import time
import warnings
from pathlib import Path

import torch

from ..errors import LlmbinError, missing_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; builds there are not guarded against each other
    fcntl = None

# A wheel ships them as llmbin/kernels/csrc/; a source checkout keeps them in the top-level kernels/.
SOURCE_DIR = next((d for d in (Path(__file__).with_name("csrc"), Path(__file__).parents[2] / "kernels")
                   if (d / "packed_matmul_cpu.cpp").exists()), Path(__file__).parents[2] / "kernels")
SOURCES = [SOURCE_DIR / "packed_matmul_cpu.cpp", SOURCE_DIR / "half_matvec_cpu.cpp",  # the first defines the module
           SOURCE_DIR / "table_matvec_cpu.cpp", SOURCE_DIR / "rotate_cpu.cpp"]
# "auto": the fastest path (AVX2 table lookup: ~1e-4 of Σ|x·w| from table rounding);
# "exact": the fastest exact-fp32 path (AVX2 float, else scalar).
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avx2-lut": 4, "exact": 5}
FLAGS = ["-O3", "-fopenmp"]
TORCH_LOCK = "lock"  # the marker file torch's extension builder waits on, forever if it is stale


def build_directory() -> Path:
    """The cache folder of this build: keyed by what makes the binary, and nothing else: the
    sources' content, the flags, the compiler (resolved), and the header and library paths exactly
    as torch's builder writes them into the commands. ninja rebuilds whenever a command changes, so
    two environments sharing one folder rebuild each other's binary in turn; that includes one venv
    reached by two paths (a link), whose torch writes each path as it was imported, unresolved."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    paths = [*cpp_extension.include_paths(), *cpp_extension.library_paths(), sysconfig.get_paths()["include"]]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(FLAGS).encode()
                         + "\n".join(paths).encode() + compiler_path().encode()).hexdigest()[:12]
    return cache_root() / f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{key}"


def compiler_path() -> str:
    """The C++ compiler torch's builder will run (``$CXX``, else ``c++`` on PATH), resolved; "" if none."""
    found = shutil.which(os.environ.get("CXX") or "c++")
    return os.path.realpath(found) if found else ""


def use_environment_ninja() -> None:
    """Put the ninja installed beside this interpreter (pip's, a dependency) first on PATH, for
    the builds of this process. torch runs whichever ``ninja`` PATH finds first, and ninja
    versions keep incompatible build logs: the same venv run with and without its ``bin`` on
    PATH (pip's ninja 1.13, the system's 1.11) rebuilt the binary each time the other one had
    built it, about 60 s each."""
    local = Path(sys.executable).parent
    if (local / "ninja").exists() and shutil.which("ninja") != str(local / "ninja"):
        os.environ["PATH"] = str(local) + os.pathsep + os.environ.get("PATH", "")


def cache_root() -> Path:
    return Path(os.environ.get("LLMBIN_KERNEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                              "llmbin", "kernels"))


def secure_cache(directory: Path) -> None:
    """Create the build folder (and the cache root) for this user alone, and refuse a cache that
    someone else could have written: its library is loaded into this process (its constructors
    run) and its sources and build file are compiled, so a planted file would run as this user.
    The root and every folder of the build must belong to this user and be writable by no one
    else; every file in the build must belong to this user and not be a link. A file's own mode
    does not matter: no one else can reach it in a folder only its owner can write."""
    if not hasattr(os, "getuid"):  # Windows: no owners or modes to check
        return
    root = directory.parent
    for folder in (root, directory):
        problem = missing_path(folder, "folder")
        if problem == "does not exist":
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # another process may create it too
                continue
            except OSError as exc:
                problem = f"cannot be created ({exc.strerror or exc})"
        if problem:
            raise LlmbinError(f"the CPU kernel cache {folder} {problem}; set LLMBIN_KERNEL_CACHE to a folder you can "
                              "write, or fix that path")
    entries = [(root, os.stat(root))]  # the root may be a link the user made (~/.cache elsewhere)
    for folder, subfolders, files in os.walk(directory):
        entries += [(Path(folder, name), os.lstat(Path(folder, name))) for name in [*subfolders, *files]]
        entries.append((Path(folder), os.lstat(folder)))
    for path, st in entries:
        if stat.S_ISLNK(st.st_mode):
            problem, fix = "is a link", f"delete {path}"
        elif st.st_uid != os.getuid():
            problem, fix = f"belongs to another user (uid {st.st_uid})", f"delete {path}"
        elif stat.S_ISDIR(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem, fix = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})", f"run chmod go-w {path}"
        else:
            continue
        raise LlmbinError(f"the CPU kernel cache {path} {problem}, and llmbin loads and compiles what that cache holds: "
                          f"{fix}, or set LLMBIN_KERNEL_CACHE to a folder only you can write")


def cached_sources(directory: Path) -> list[Path]:
    """The sources as the build compiles them: copies inside the build folder, made once. ninja
    decides by modification times, so compiling a checkout's own files rebuilt the binary after
    every fresh clone or branch switch although not a byte had changed."""
    copies = []
    for source in SOURCES:
        copy = directory / "src" / source.name
        if not copy.exists():
            copy.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = copy.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_bytes(source.read_bytes())
            tmp.replace(copy)
        copies.append(copy)
    return copies


def _try_lock(handle, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


@contextlib.contextmanager
def build_lock(directory: Path):
    """One builder per directory. torch's own marker file survives a build that was killed
    (Ctrl-C, a timeout, a machine image taken mid-build) and then blocks every later process
    forever; an OS lock is released when its holder dies, so whoever holds it may delete the marker.
    A process that has to wait says so, once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "llmbin.lock", "a") as handle:
        if fcntl is not None:
            if not _try_lock(handle, seconds=3.0):  # a load of a finished build holds it for a moment: no word
                print(f"llmbin: waiting for another process to finish building the CPU kernel in {directory} "
                      "(a first build takes a few minutes)", file=sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
        (directory / TORCH_LOCK).unlink(missing_ok=True)
        yield


def check_plan_fields(module) -> None:
    """Refuse a build whose entry points take other plan fields, or another order, than
    ``KernelPlan`` declares: the C++ source lists them once (``LLMBIN_PLAN_TENSORS``,
    ``LLMBIN_PLAN_INTS``) and exports them as ``plan_fields()``."""
    from .plan import PLAN_INTS, PLAN_TENSORS

    expected = (list(PLAN_TENSORS), list(PLAN_INTS))
    built = tuple(list(names) for names in module.plan_fields())
    if built != expected:
        raise RuntimeError(f"llmbin: the C++ kernel ({SOURCES[0].name}) takes the plan fields {built[0]} + {built[1]}, "
                           f"but KernelPlan (llmbin/kernels/plan.py) has {expected[0]} + {expected[1]}; the two "
                           "lists must be the same, in the same order")


def build_failure(exc: Exception) -> str:
    """One line for a failed build: torch's message without the ninja command line it quotes
    (hundreds of characters), and the compiler's first error, if it printed one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head = lines[0].split(": [", 1)[0]  # "Error building extension 'x': [1/3] c++ -MMD ..."
    error = next((line for line in lines[1:] if "error" in line.lower() and not line.startswith("FAILED")), None)
    return f"{head}: {error[:200]}" if error else head[:200]


def _fall_back(reason: str) -> None:
    warnings.warn(f"llmbin: the CPU kernel could not be built ({reason}); using the slower plain-torch reference "
                  "path. Install a C++ compiler (g++ or clang, or set CXX) and ninja to get it; "
                  "LLMBIN_KERNEL_VERBOSE=1 shows the build", stacklevel=3)
    return None


@torch.compiler.assume_constant_result
def cpu_ops_ready() -> bool:
    """Whether the extension is loaded, and with it the CPU kernels of the ``torch.ops.llmbin_cpu``
    operators (registered by the C++ module, which a compiled graph calls with no Python between).
    A constant to a trace, which never builds the extension: ``prepare_decode`` loads it first."""
    return extension.cache_info().currsize > 0 and extension() is not None


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module, or None when it cannot be built here."""
    use_environment_ninja()
    directory = build_directory()
    secure_cache(directory)  # outside the try: a cache others can write is refused, not worked around
    verbose = bool(os.environ.get("LLMBIN_KERNEL_VERBOSE"))
    if not compiler_path():
        return _fall_back(f"no C++ compiler: {os.environ.get('CXX') or 'c++'} is not found")
    try:
        import logging

        from torch.utils import cpp_extension

        torch_log = logging.getLogger(cpp_extension.__name__)
        level = torch_log.level
        torch_log.setLevel(logging.DEBUG if verbose else logging.ERROR)  # its banners are many lines; ours is one
        try:
            with build_lock(directory):
                module = cpp_extension.load(name="llmbin_packed_cpu", sources=[str(p) for p in cached_sources(directory)],
                                            build_directory=str(directory), extra_cflags=FLAGS,
                                            extra_ldflags=["-fopenmp"], verbose=verbose)
        finally:
            torch_log.setLevel(level)
    except Exception as exc:  # noqa: BLE001 (any build failure means: use the reference path)
        return _fall_back(build_failure(exc))
    check_plan_fields(module)  # outside the try: a drifted argument list is a bug to report, not a missing compiler
    return module
