"""``write_streamed``: a safetensors file written one tensor at a time, with its digests in the header."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.multiprocessing.reductions import StorageWeakRef

from llmbin.checkpoint.digests import file_digests
from llmbin.checkpoint.tensors import file_metadata, read_tensors, write_streamed, write_tensors
from llmbin.errors import LlmbinError

LAYERS = {"proj": {"kind": "example", "rows": 3}}


def every_kind() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w.float": torch.randn(3, 5, generator=g), "w.half": torch.randn(7, 3, generator=g).half(),
            "w.bf16": torch.randn(5, generator=g).bfloat16(), "codes": torch.randint(0, 256, (13,), dtype=torch.uint8),
            "signed": torch.randint(-9, 9, (2, 3), dtype=torch.int8), "index": torch.tensor(41, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]), "empty": torch.empty(0, 4),
            "odd": torch.randint(-5, 5, (3,), dtype=torch.int16)}


def test_safetensors_reads_back_every_dtype_and_shape_exactly(tmp_path):
    tensors = every_kind()
    write_tensors(tmp_path / "x.safetensors", tensors, LAYERS)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name


def test_the_header_says_what_save_file_with_the_same_metadata_says(tmp_path):
    tensors = every_kind()
    write_tensors(tmp_path / "streamed.safetensors", tensors, LAYERS)
    save_file(tensors, str(tmp_path / "whole.safetensors"), metadata=file_metadata(LAYERS, tensors))
    for file in ("streamed", "whole"):
        with safe_open(str(tmp_path / f"{file}.safetensors"), framework="pt") as f:
            if file == "streamed":
                streamed = f.metadata()
            else:
                assert f.metadata() == streamed
    assert file_digests(tmp_path / "streamed.safetensors") == file_digests(tmp_path / "whole.safetensors")
    assert json.loads(streamed["digests"]).keys() == set(tensors) | {"__layers__"}
    read_tensors(tmp_path / "streamed.safetensors")  # verifies every digest


def test_each_tensor_is_released_before_the_next_is_fetched(tmp_path):
    shapes = {f"t{i}": torch.empty(64, 32, device="meta") for i in range(5)}
    alive: list[StorageWeakRef] = []

    def fetch(name):  # no gc.collect(): the writer must drop its references (views too), not leave them to the collector
        assert all(ref.expired() for ref in alive), f"a tensor's memory is still held when {name} is fetched"
        tensor = torch.full((64, 32), float(name[1:]))
        alive.append(StorageWeakRef(tensor.untyped_storage()))
        return tensor

    write_streamed(tmp_path / "x.safetensors", shapes, fetch, {})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert [float(back[f"t{i}"][0, 0]) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("wrong", [torch.zeros(3, 4, dtype=torch.float16), torch.zeros(4, 3)], ids=["dtype", "shape"])
def test_a_tensor_unlike_its_announced_shape_is_refused_and_nothing_is_left(tmp_path, wrong):
    shapes = {"a": torch.empty(2, device="meta"), "b": torch.empty(3, 4, device="meta")}
    tensors = {"a": torch.ones(2), "b": wrong}
    with pytest.raises(LlmbinError, match="b is .* expected \\(3, 4\\) torch.float32"):
        write_streamed(tmp_path / "x.safetensors", shapes, tensors.__getitem__, {})
    assert not (tmp_path / "x.safetensors").exists()


def test_a_failing_fetch_leaves_no_half_written_file(tmp_path):
    def fetch(name):
        if name == "b":
            raise KeyboardInterrupt
        return torch.ones(4)

    with pytest.raises(KeyboardInterrupt):
        write_streamed(tmp_path / "x.safetensors", {n: torch.empty(4, device="meta") for n in "ab"}, fetch, {})
    assert not (tmp_path / "x.safetensors").exists()
