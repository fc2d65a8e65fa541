"""The just-in-time build of the C++ kernel: its cache key, and recovery from a killed build."""
import os
import shutil
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


def test_a_build_killed_halfway_does_not_block_the_next_process(ext, tmp_path):
    # torch's builder leaves its marker file behind when killed and later processes wait on it
    # forever; this is what a machine image taken mid-build looks like.
    built = cpu.build_directory()
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / built.name, ignore=shutil.ignore_patterns("*.lock", cpu.TORCH_LOCK))
    (cache / built.name / cpu.TORCH_LOCK).touch()
    code = "from llmbin.kernels.cpu import extension; assert extension() is not None; print('loaded')"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LLMBIN_KERNEL_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert not (cache / built.name / cpu.TORCH_LOCK).exists()
