"""The just-in-time build of the C++ kernel: its cache key, and recovery from a killed build."""
import subprocess
import sys

from llmbin.kernels import cpu


def test_the_cache_directory_follows_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBIN_KERNEL_CACHE", str(tmp_path))
    first = cpu.build_directory()
    seen = {first}
    for i, source in enumerate(cpu.SOURCES):  # an edit to any source file
        edited = tmp_path / f"edited-{source.name}"
        edited.write_bytes(source.read_bytes() + b"\n// edited\n")
        monkeypatch.setattr(cpu, "SOURCES", [edited if j == i else s for j, s in enumerate(cpu.SOURCES)])
        again = cpu.build_directory()
        assert again.parent == tmp_path
        assert again not in seen, f"an edited {source.name} must not load the old binary"
        seen.add(again)
        monkeypatch.undo()
        monkeypatch.setenv("LLMBIN_KERNEL_CACHE", str(tmp_path))


def test_a_build_killed_halfway_does_not_block_the_next_process(ext):
    # torch's builder leaves its marker file behind when killed and later processes wait on it
    # forever; this is what a machine image taken mid-build looks like (the marker in the cache
    # folder of an otherwise complete build, so nothing needs compiling again).
    built = cpu.build_directory()
    (built / cpu.TORCH_LOCK).touch()
    code = "from llmbin.kernels.cpu import extension; assert extension() is not None; print('loaded')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert not (built / cpu.TORCH_LOCK).exists()


def test_a_fresh_checkout_of_the_same_sources_does_not_rebuild(ext, tmp_path):
    """ninja rebuilds by modification time; a fresh clone (same bytes, new times) must load the cached binary."""
    built = cpu.build_directory()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for source in cpu.SOURCES:  # the same bytes with a newer modification time, as a fresh clone has them
        (checkout / source.name).write_bytes(source.read_bytes())
    binary = next(built.glob("llmbin_packed_cpu*.so"))
    before = binary.stat().st_mtime_ns
    code = ("from pathlib import Path; from llmbin.kernels import cpu; "
            f"cpu.SOURCES = [Path({str(checkout)!r}) / p.name for p in cpu.SOURCES]; "
            "assert cpu.build_directory().name == " + repr(built.name) + "; "
            "assert cpu.extension() is not None; print('loaded')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert binary.stat().st_mtime_ns == before
    assert [p.parent for p in cpu.cached_sources(built)] == [built / "src"] * len(cpu.SOURCES)


def test_a_process_waiting_for_another_build_says_so(tmp_path, capsys):
    import fcntl

    with open(tmp_path / "llmbin.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code = ("import sys; from pathlib import Path; from llmbin.kernels.cpu import build_lock\n"
                f"with build_lock(Path({str(tmp_path)!r})): print('built')")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()
        assert line.startswith(f"llmbin: waiting for another process to finish building the CPU kernel in {tmp_path}")
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == "built"


def test_a_lock_held_for_a_moment_gives_no_message(tmp_path):
    # processes of one torchrun run load the finished build at once; each load holds the lock briefly
    import fcntl
    import time

    with open(tmp_path / "llmbin.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code = ("import sys; from pathlib import Path; from llmbin.kernels.cpu import build_lock\n"
                f"print('trying', flush=True)\nwith build_lock(Path({str(tmp_path)!r})): print('built')")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "trying"
        time.sleep(1.0)  # the child waits on the lock for this long
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "built" and "waiting" not in err


def test_a_kernel_cache_that_others_can_write_is_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    """Issue 35's probe: a library planted in a cache folder with mode 0777 was loaded on first
    kernel use, and its constructor ran."""
    import os

    import pytest

    from llmbin.errors import LlmbinError

    root = tmp_path / "cache"
    monkeypatch.setenv("LLMBIN_KERNEL_CACHE", str(root))
    planted = cpu.build_directory()
    planted.mkdir(parents=True)
    (planted / "llmbin_packed_cpu.so").write_bytes(b"not a library: loading it would fail loudly")
    os.chmod(root, 0o777)
    with pytest.raises(LlmbinError, match=rf"^the CPU kernel cache {root} is writable by other users \(mode 777\), "
                                          rf".*: run chmod go-w {root}, or set LLMBIN_KERNEL_CACHE to a folder only you"):
        cpu.extension.__wrapped__()  # the uncached function: an earlier test may have loaded the real kernel


def test_the_kernel_cache_is_made_private_and_checked_file_by_file(tmp_path, monkeypatch):
    import os

    import pytest

    from llmbin.errors import LlmbinError

    old = os.umask(0o002)  # a distribution whose users' files are group-writable by default
    try:
        build = tmp_path / "cache" / "build"
        cpu.secure_cache(build)
        cpu.cached_sources(build)
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in (build.parent, build, build / "src")] == ["0o700"] * 3
    os.chmod(build / "src", 0o770)
    with pytest.raises(LlmbinError, match=r"src is writable by other users \(mode 770\)"):
        cpu.secure_cache(build)
    os.chmod(build / "src", 0o700)
    (build / "build.ninja").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LlmbinError, match=r"build.ninja is a link, .*: delete .*build.ninja, or set LLMBIN_KERNEL_CACHE"):
        cpu.secure_cache(build)
    (build / "build.ninja").unlink()
    cpu.secure_cache(build)
    if os.getuid() == 0:  # only root can give a file away; CI runs as root
        os.chown(build / "src" / cpu.SOURCES[0].name, 4242, 4242)
        with pytest.raises(LlmbinError, match=r"belongs to another user \(uid 4242\)"):
            cpu.secure_cache(build)


def test_a_kernel_cache_that_is_a_file_is_a_one_line_error(tmp_path, monkeypatch):
    """The second probe: LLMBIN_KERNEL_CACHE naming a file failed with a FileExistsError traceback."""
    import pytest

    from llmbin.errors import LlmbinError

    (tmp_path / "kc").write_text("x")
    monkeypatch.setenv("LLMBIN_KERNEL_CACHE", str(tmp_path / "kc"))
    with pytest.raises(LlmbinError) as info:
        cpu.extension.__wrapped__()
    assert str(info.value) == (f"the CPU kernel cache {tmp_path}/kc is a file, not a folder; set LLMBIN_KERNEL_CACHE to "
                               "a folder you can write, or fix that path")


def _build_in_a_fresh_cache(tmp_path, compiler):
    import os

    env = {**os.environ, "CXX": str(compiler), "LLMBIN_KERNEL_CACHE": str(tmp_path / "cache")}
    env.pop("LLMBIN_KERNEL_VERBOSE", None)
    code = "from llmbin.kernels.cpu import extension; assert extension() is None"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if line.strip()]


def test_without_a_compiler_the_fallback_says_so_in_one_line(tmp_path):
    """Issue 35's probe: the fallback printed torch's multi-line banner and a 750-character ninja
    command instead of one line."""
    lines = _build_in_a_fresh_cache(tmp_path, tmp_path / "no-such-g++")
    assert len(lines) == 1 and lines[0].endswith(
        f"UserWarning: llmbin: the CPU kernel could not be built (no C++ compiler: {tmp_path}/no-such-g++ is not found); "
        "using the slower plain-torch reference path. Install a C++ compiler (g++ or clang, or set CXX) and ninja to get "
        "it; LLMBIN_KERNEL_VERBOSE=1 shows the build")


def test_a_failed_compile_is_reported_by_its_first_error_without_the_build_command(tmp_path):
    compiler = tmp_path / "g++"
    compiler.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "g++ (GCC) 12.2.0"; exit 0; fi\n'
                        'echo "packed_matmul_cpu.cpp:1:1: error: boom" >&2\nexit 1\n')
    compiler.chmod(0o755)
    lines = _build_in_a_fresh_cache(tmp_path, compiler)
    warning = [line for line in lines if "UserWarning" in line]
    assert len(warning) == 1 and "(Error building extension 'llmbin_packed_cpu': packed_matmul_cpu.cpp:1:1: error: boom);" \
        in warning[0]
    assert not any("-MMD" in line or "WARNING !!" in line for line in lines), lines


def test_the_environments_own_ninja_builds_whatever_path_says(monkeypatch):
    """Issue 35's probe: run with and without the venv's bin on PATH, the system's ninja 1.11 and
    pip's 1.13 took turns, and each discarded the other's build log and rebuilt (60 s a time)."""
    import os
    import shutil
    from pathlib import Path

    local = Path(sys.executable).parent / "ninja"
    assert local.exists(), "ninja is a dependency: pip installs it beside the interpreter"
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    cpu.use_environment_ninja()
    assert shutil.which("ninja") == str(local)
    path = os.environ["PATH"]
    cpu.use_environment_ninja()  # already first: PATH is left as it is
    assert os.environ["PATH"] == path


def test_the_cache_key_follows_the_compiler_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBIN_KERNEL_CACHE", str(tmp_path / "cache"))
    folders = {}
    for name in ("g++-12", "clang++"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
        monkeypatch.setenv("CXX", str(tmp_path / name))
        folders[name] = cpu.build_directory()
    (tmp_path / "c++").symlink_to(tmp_path / "g++-12")  # the same compiler by another name
    monkeypatch.setenv("CXX", str(tmp_path / "c++"))
    assert folders["g++-12"] != folders["clang++"] and cpu.build_directory() == folders["g++-12"]


def test_one_venv_reached_by_two_paths_keeps_two_builds(tmp_path):
    """The second probe: a venv used through a link (here, a worktree's .venv linking to the checkout's)
    wrote its headers' paths into the compile command unresolved, under the same cache key as the
    venv's own path, and the two rebuilt each other's binary in turn (four builds in an hour). The
    key now holds the paths as torch writes them: two folders, each built once."""
    import os
    from pathlib import Path

    link = tmp_path / "venv"
    link.symlink_to(sys.prefix)
    code = ("from torch.utils import cpp_extension; from llmbin.kernels import cpu; "
            "print(cpu.build_directory()); print(cpp_extension.include_paths()[0])")
    env = {**os.environ, "PYTHONPATH": str(Path(cpu.__file__).parents[2]), "LLMBIN_KERNEL_CACHE": str(tmp_path / "kc")}
    seen = [subprocess.run([str(prefix / "bin" / "python"), "-c", code], env=env, capture_output=True, text=True,
                           check=True).stdout.split() for prefix in (Path(sys.prefix), link)]
    assert seen[1][1].startswith(str(link)) and not seen[0][1].startswith(str(link))  # torch writes it as imported
    assert seen[0][0] != seen[1][0]
