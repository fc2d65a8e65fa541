"""Finished blocks on disk, so an interrupted quantization resumes where it stopped."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import modules_from_tensors, read_tensors, write_tensors
from .errors import LlmbinError
from .nn.binary_linear import BinaryLinear

RUN_FILE = "run.json"


class BlockStore:
    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        run = self.dir / RUN_FILE
        if run.exists() and json.loads(run.read_text()) != fingerprint:
            raise LlmbinError(
                f"{self.dir} holds blocks of a run with other options; rerun with the same options to resume, "
                "or delete that folder to start over"
            )
        run.write_text(json.dumps(fingerprint, sort_keys=True))

    def _path(self, index: int) -> Path:
        return self.dir / f"block_{index:05d}.safetensors"

    def load(self) -> dict[int, dict[str, BinaryLinear]]:
        done, index = {}, 0
        while self._path(index).exists():
            tensors, layers = read_tensors(self._path(index))
            done[index] = modules_from_tensors(tensors, layers)
            index += 1
        return done

    def save(self, index: int, modules: dict[str, BinaryLinear]) -> None:
        tensors = {f"{name}.{key}": value for name, m in modules.items() for key, value in m.state_dict().items()}
        tmp = self._path(index).with_suffix(".tmp")
        write_tensors(tmp, tensors, modules)
        tmp.rename(self._path(index))  # a block file exists only once it is complete
