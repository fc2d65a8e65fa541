"""Several processes, one quantization: the torch.distributed plumbing the driver uses.

A run launched with ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment)
joins a process group: gloo on the CPU, NCCL on CUDA (each process on ``cuda:LOCAL_RANK``).

The calibration windows are cut into fixed chunks of :data:`CHUNK_WINDOWS` consecutive windows,
whatever the world size, and chunk ``c`` belongs to rank ``c mod world``. Each rank runs only its
own windows through the blocks. A layer's Hessian is the sum of the chunks' sums ``Σ x xᵀ``, added
in chunk order, the running total passed from chunk owner to chunk owner: every addition is the
one a single process does, so the Hessians, and the checkpoint, are bit-identical at any world
size (with the same threads per process, as a BLAS may split a product by thread).

Messages are dicts of tensors with a JSON header (names, dtypes, shapes, and an ``info`` dict),
each tensor sent as its bytes: one mechanism for Hessians, packed layers and resumed blocks.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import LlmbinError

CHUNK_WINDOWS = 4  # windows per chunk: part of the arithmetic (the order of the Hessian sums), so fixed
TIMEOUT_ENV = "LLMBIN_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 2 * 3600  # a rank may wait this long for another's layer (a 70B block took 2,917 s on a CPU)


class PeerLost(LlmbinError):
    """A message could not be sent or received: another process of the run failed, was killed, or
    cannot be reached. The launcher (torchrun) then stops the others; this is what they say."""


@contextmanager
def _talking(what: str):
    try:
        yield
    except RuntimeError as exc:  # gloo's and NCCL's errors (DistBackendError is one)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.split("] ", 1)[-1].split(". ")[0][:160]  # gloo prefixes its source file and line
        raise PeerLost(f"lost contact with another process while {what} ({reason}); another rank failed or was "
                       "killed, its own message or the launcher's summary says which") from None


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world``; ``device`` carries the messages."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes the finished blocks, the checkpoint and the reports."""
        return self.rank == 0

    def chunk_owner(self, chunk: int) -> int:
        return chunk % self.world


SINGLE = Ranks()


def current() -> Ranks:
    """The running process group's ranks, or a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def launched_world() -> int:
    """The world size a launcher (torchrun, accelerate launch) set, 1 when none did."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise LlmbinError(f"WORLD_SIZE={text!r} in the environment is not a number; launch with torchrun") from None


def init_from_environment(device: str) -> tuple[Ranks, str]:
    """Join the launcher's process group when ``WORLD_SIZE`` > 1 (gloo for ``cpu``, NCCL for ``cuda``):
    the ranks, and the device this process computes on (``cuda:LOCAL_RANK`` for ``cuda``)."""
    import torch.distributed as dist

    if launched_world() <= 1:
        return SINGLE, device
    kind = torch.device(device).type
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise LlmbinError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                              "launch at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        try:
            seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        except ValueError:
            raise LlmbinError(f"{TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=seconds))
    return current(), device


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def chunks(count: int) -> list[range]:
    """The calibration windows ``0..count-1`` in chunks of :data:`CHUNK_WINDOWS`."""
    return [range(start, min(start + CHUNK_WINDOWS, count)) for start in range(0, count, CHUNK_WINDOWS)]


def own_windows(ranks: Ranks, count: int) -> list[int]:
    """The windows ``ranks`` runs: those of its chunks, in order."""
    return [w for c, part in enumerate(chunks(count)) if ranks.chunk_owner(c) == ranks.rank for w in part]


def window_owner(window: int, ranks: Ranks) -> int:
    """The rank that holds calibration window ``window``."""
    return ranks.chunk_owner(window // CHUNK_WINDOWS)


def check_world(ranks: Ranks, count: int) -> None:
    if ranks.world > len(chunks(count)):
        raise LlmbinError(f"{ranks.world} processes but {count} calibration windows make only {len(chunks(count))} "
                          f"chunks of {CHUNK_WINDOWS}; launch at most {len(chunks(count))} processes or give more "
                          "--nsamples")


def assign(costs: list[float], world: int) -> list[int]:
    """A rank for each job: largest first, to the least loaded rank (the lowest on ties). It only
    balances the work; each job's result does not depend on where it runs."""
    load, owner = [0.0] * world, [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[job] = rank
        load[rank] += costs[job]
    return owner


# --- messages: a dict of tensors and a JSON-able info dict ---

def _header(tensors: dict[str, torch.Tensor], info: dict) -> bytes:
    entries = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]
    return json.dumps({"info": info, "tensors": entries}).encode()


def _bytes_of(t: torch.Tensor, device: str) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).to(device)


def _empty(entry: list, device: str) -> tuple[str, torch.Tensor]:
    name, dtype, shape = entry
    dtype = getattr(torch, dtype)
    count = 1
    for n in shape:
        count *= n
    return name, torch.empty(count * dtype.itemsize, dtype=torch.uint8, device=device)


def _typed(raw: torch.Tensor, entry: list, device: torch.device | str) -> torch.Tensor:
    _, dtype, shape = entry
    return raw.view(getattr(torch, dtype)).reshape(shape).to(device)


def _exchange_header(text: bytes | None, move, ranks: Ranks) -> dict:
    """The message's JSON header, moved by ``move`` (a send, a receive or a broadcast of one tensor):
    ``text`` on the side that has it, None on the side that receives it."""
    length = torch.tensor([len(text) if text is not None else 0], dtype=torch.int64, device=ranks.device)
    move(length)
    header = (torch.frombuffer(bytearray(text), dtype=torch.uint8).to(ranks.device) if text is not None
              else torch.empty(int(length.item()), dtype=torch.uint8, device=ranks.device))
    move(header)
    return json.loads(bytes(header.cpu().tolist()))


def _put(tensors: dict[str, torch.Tensor], move, ranks: Ranks) -> None:
    for t in tensors.values():
        if t.numel():
            move(_bytes_of(t, ranks.device))


def _take(parsed: dict, move, ranks: Ranks, device) -> tuple[dict[str, torch.Tensor], dict]:
    out = {}
    for entry in parsed["tensors"]:
        name, raw = _empty(entry, ranks.device)
        if raw.numel():
            move(raw)
        out[name] = _typed(raw, entry, device)
    return out, parsed["info"]


def send(tensors: dict[str, torch.Tensor], info: dict, dst: int, ranks: Ranks) -> None:
    import torch.distributed as dist

    with _talking(f"sending to rank {dst}"):
        move = lambda t: dist.send(t, dst)  # noqa: E731
        _exchange_header(_header(tensors, info), move, ranks)
        _put(tensors, move, ranks)


def recv(src: int, ranks: Ranks, device: torch.device | str) -> tuple[dict[str, torch.Tensor], dict]:
    import torch.distributed as dist

    with _talking(f"waiting for rank {src}"):
        move = lambda t: dist.recv(t, src)  # noqa: E731
        return _take(_exchange_header(None, move, ranks), move, ranks, device)


def broadcast(tensors: dict[str, torch.Tensor] | None, info: dict | None, src: int, ranks: Ranks,
              device: torch.device | str) -> tuple[dict[str, torch.Tensor], dict]:
    """``src``'s ``tensors`` and ``info`` on every rank (others pass None), on ``device``."""
    import torch.distributed as dist

    with _talking(f"exchanging with rank {src}"):
        move = lambda t: dist.broadcast(t, src)  # noqa: E731
        if ranks.rank == src:
            _exchange_header(_header(tensors, info), move, ranks)
            _put(tensors, move, ranks)
            return tensors, info
        return _take(_exchange_header(None, move, ranks), move, ranks, device)


def broadcast_value(value, src: int, ranks: Ranks):
    """A small JSON-able value from ``src`` on every rank."""
    return broadcast({} if ranks.rank == src else None, {"value": value} if ranks.rank == src else None, src, ranks,
                     "cpu")[1]["value"]
