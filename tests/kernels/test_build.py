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
