"""Finished blocks on disk, so an interrupted quantization resumes where it stopped, and the
checkpoint can be written from them without the packed model ever being in memory whole."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import LlmbinError
from ..nn.binary_linear import BinaryLinear
from ..packing.packed_weight import PackedWeight
from .folder import write_error
from .tensors import file_layers, layer_metadata, read_tensors, write_tensors

RUN_FILE = "run.json"


class BlockStore:
    def __init__(self, directory: str | os.PathLike, fingerprint: dict):
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, self.dir) from None
        run = self.dir / RUN_FILE
        check_resumable(self.dir, fingerprint)
        try:
            run.write_text(json.dumps(fingerprint, sort_keys=True))
        except OSError as exc:
            raise write_error(exc, run) from None

    def _path(self, index: int) -> Path:
        return block_path(self.dir, index)

    def finished(self) -> "FinishedBlocks":
        return finished_blocks(self.dir)

    def save(self, index: int, modules: dict[str, BinaryLinear | torch.Tensor]) -> None:
        """Persist block ``index``'s packed layers and tuned parameters (keyed by their names inside the block)."""
        tensors, layers = block_tensors(modules)
        tmp = self._path(index).with_suffix(".tmp")
        write_tensors(tmp, tensors, layers)
        tmp.rename(self._path(index))  # a block file exists only once it is complete


def block_tensors(modules: dict[str, BinaryLinear | torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A finished block as stored: its tensors by name in the block, and its packed layers' descriptions
    (:func:`modules_from_tensors` turns them back into the block's modules)."""
    layers = {name: m for name, m in modules.items() if isinstance(m, BinaryLinear)}
    tensors = {f"{name}.{key}": value for name, m in layers.items() for key, value in m.state_dict().items()}
    tensors.update({name: value for name, value in modules.items() if name not in layers})
    return tensors, layer_metadata(layers)


def check_resumable(directory: str | os.PathLike, fingerprint: dict) -> None:
    """Refuse to resume the finished blocks in ``directory`` unless its run had this ``fingerprint``;
    only the keys given are compared, so the options can be checked before the model loads and
    the rest (the model's weights digest, the calibration checksum) once they are known."""
    directory = Path(directory)
    run = directory / RUN_FILE
    if not run.exists() or not len(finished_blocks(directory)):  # without a finished block there is nothing to mix
        return
    try:
        before = json.loads(run.read_text())
    except (OSError, ValueError) as exc:
        raise LlmbinError(f"{run} is unreadable ({exc}); delete {directory} to start over") from None
    now = json.loads(json.dumps(fingerprint))  # as it would read back (tuples become lists)
    before = {k: before.get(k) for k in now} if isinstance(before, dict) else before
    if before != now:
        raise LlmbinError(f"{directory} holds blocks of another run ({differences(before, now)}); rerun "
                          "with the same model and options to resume, or delete that folder to start over")


def differences(before: dict, now: dict, limit: int = 3) -> str:
    """What changed between two fingerprints, e.g. ``config.salient_frac: 0.1 then, 0.2 now``."""
    def flat(d, prefix=""):
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else ()):
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def show(v, other):
        """About 40 characters, from a little before where the two values first differ: two long
        paths cut to the same first 17 characters looked equal."""
        text, against = json.dumps(v), json.dumps(other)
        same = len(os.path.commonprefix([text, against]))
        start = same - 10 if same >= 20 and max(len(text), len(against)) > 40 else 0
        return ("…" if start else "") + text[start:start + 40] + ("…" if start + 40 < len(text) else "")

    a, b = flat(before), flat(now)
    changed = [f"{k}: {show(a.get(k), b.get(k))} then, {show(b.get(k), a.get(k))} now"
               for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(changed[:limit]) + (f"; and {len(changed) - limit} more" if len(changed) > limit else "")


def damaged_block(path: Path, exc: LlmbinError) -> LlmbinError:
    """A damaged finished block: the fix is to quantize that block again, not to re-create a checkpoint."""
    problem = str(exc).split("; ")[0]
    return LlmbinError(f"finished block {problem} (damaged); delete {path} and rerun the same command to quantize "
                       "that block again")


def block_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"block_{index:05d}.safetensors"


def finished_blocks(directory: str | os.PathLike) -> "FinishedBlocks":
    """The finished blocks in ``directory`` (the consecutive run from block 0), each read only when asked for."""
    count = 0
    while block_path(directory, count).exists():
        count += 1
    return FinishedBlocks([block_path(directory, i) for i in range(count)])


class FinishedBlocks(Mapping):
    """``index -> {layer name in the block: BinaryLinear}``, read lazily; a tuned block's other
    tuned parameters (norm weights) come with them, as tensors under their names in the block."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __getitem__(self, index: int) -> dict[str, BinaryLinear | torch.Tensor]:
        if not isinstance(index, int) or not 0 <= index < len(self.paths):
            raise KeyError(index)
        try:
            tensors, layers = read_tensors(self.paths[index])
            return {**modules_from_tensors(tensors, layers), **tensors}  # what the layers did not consume
        except LlmbinError as exc:
            raise damaged_block(self.paths[index], exc) from None

    def __contains__(self, index) -> bool:
        return isinstance(index, int) and 0 <= index < len(self.paths)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)

    def tensor_index(self, block_prefix: str) -> dict[str, dict]:
        """Full state-dict name -> ``{"safetensors_file", "weight_name"}`` of every stored tensor, for
        accelerate's ``OffloadedWeightsLoader``; ``block_prefix`` is the decoder list's name."""
        from safetensors import safe_open

        index = {}
        for i, path in enumerate(self.paths):
            try:
                file_layers(path)  # a foreign or damaged file fails here, by name
            except LlmbinError as exc:
                raise damaged_block(path, exc) from None
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    index[f"{block_prefix}.{i}.{key}"] = {"safetensors_file": str(path), "weight_name": key}
        return index


def modules_from_tensors(tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, BinaryLinear]:
    """Build ``BinaryLinear`` modules, consuming their tensors from ``tensors``."""
    modules = {}
    for name, meta in layers.items():
        try:
            packed = PackedWeight.from_tensors(tensors, name, meta)
        except (KeyError, ValueError, TypeError) as exc:
            raise LlmbinError(f"checkpoint layer {name} is damaged ({exc}); re-create the checkpoint") from None
        for key in packed.tensors(name):
            del tensors[key]
        modules[name] = BinaryLinear(packed, tensors.pop(f"{name}.bias", None))
    return modules
