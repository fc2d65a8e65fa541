"""The calibration activations between decoder blocks: one slot per calibration window.

The driver keeps one buffer. Block ``i`` reads each window's slot as its input and writes its
output into the same slot, which the window no longer needs: so the resident cost is one copy,
``nsamples × seqlen × hidden`` values in the activation dtype (bf16/fp16 for 16-bit checkpoints:
2 GiB for Llama-2-7B at 128 × 2048), not the two fp32 copies (8 GiB) of inputs and outputs.

``InMemoryActivations`` holds them in a CPU tensor. ``DiskActivations`` holds them in a file,
each window read and written through a memory map of just its slot, which is unmapped right
after: the pages then belong to the kernel's page cache, not to this process, so its resident
memory stays one window whatever the total. :func:`activation_store` picks disk when the buffer
would exceed the in-memory budget (:func:`default_budget`: a quarter of the machine's RAM, or of
the cgroup's memory limit when that is lower).
"""
from __future__ import annotations

import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import LlmbinError, missing_path

_GRANULARITY = mmap.ALLOCATIONGRANULARITY  # mmap offsets must be multiples of this


def memory_limit() -> int:
    """Bytes of memory this process may use: physical RAM, or the cgroup's limit when lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB
        total = 16 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_budget() -> int:
    """Bytes of activations kept in memory before they go to disk: a quarter of :func:`memory_limit`."""
    return memory_limit() // 4


class InMemoryActivations:
    def __init__(self, count: int, shape: tuple[int, ...], dtype: torch.dtype):
        self.dtype, self.shape = dtype, tuple(shape)
        self.data = torch.empty(count, *shape, dtype=dtype, device="cpu")  # host memory, whatever the compute device
        self.location = "memory"

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        self.data[i].copy_(value.reshape(self.shape))

    def close(self) -> None:
        self.data = torch.empty(0, device="cpu")


class DiskActivations:
    def __init__(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, directory: str | os.PathLike):
        self.dtype, self.shape, self.count = dtype, tuple(shape), count
        self.numel = math.prod(shape)
        self.slot = -(-self.numel * dtype.itemsize // _GRANULARITY) * _GRANULARITY
        directory = Path(directory)
        problem = missing_path(directory, "folder")
        if problem and problem != "does not exist":
            raise LlmbinError(f"--offload-activations {directory} {problem}; give a folder (it is created if missing)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(directory).free
        except OSError as exc:
            raise LlmbinError(f"cannot use {directory} for activations ({exc}); choose another --offload-activations") from None
        if free < count * self.slot:
            raise LlmbinError(f"{directory} has {free / 2**30:.1f} GiB free, the calibration activations need "
                              f"{count * self.slot / 2**30:.1f} GiB; free space or choose another --offload-activations")
        handle, name = tempfile.mkstemp(prefix="llmbin-activations-", suffix=".bin", dir=directory)
        self.path = Path(name)
        self.fd = handle
        os.ftruncate(self.fd, count * self.slot)  # sparse until written
        self.location = str(self.path)

    def __len__(self) -> int:
        return self.count

    def _map(self, i: int, access: int) -> mmap.mmap:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return mmap.mmap(self.fd, self.slot, offset=i * self.slot, access=access)

    def __getitem__(self, i: int) -> torch.Tensor:
        view = self._map(i, mmap.ACCESS_WRITE)  # writable, so frombuffer does not warn; nothing is written
        try:
            stored = torch.frombuffer(view, dtype=self.dtype, count=self.numel)
            out = stored.clone().view(self.shape)
            del stored  # the map cannot close while a tensor exports it
        finally:
            view.close()
        return out

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        view = self._map(i, mmap.ACCESS_WRITE)
        try:
            stored = torch.frombuffer(view, dtype=self.dtype, count=self.numel)
            stored.copy_(value.reshape(-1))
            del stored
        finally:
            view.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.path.unlink(missing_ok=True)


def activation_store(count: int, shape: tuple[int, ...], dtype: torch.dtype, *, offload_dir: str | os.PathLike | None,
                     fallback_dir: str | os.PathLike | None = None, budget: int | None = None):
    """Memory or disk for ``count`` activations of ``shape``: disk when ``offload_dir`` is given, or
    when they would exceed ``budget`` bytes (then in ``fallback_dir``, else the system's temp folder)."""
    need = count * math.prod(shape) * dtype.itemsize
    if offload_dir is None and need > (default_budget() if budget is None else budget):
        offload_dir = fallback_dir or tempfile.gettempdir()
    if offload_dir is None:
        return InMemoryActivations(count, shape, dtype)
    return DiskActivations(count, shape, dtype, offload_dir)
