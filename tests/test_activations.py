import pytest
import torch

from llmbin.activations import DiskActivations, InMemoryActivations, activation_store
from llmbin.errors import LlmbinError

SHAPE = (1, 37, 24)  # a window's bytes are not a multiple of the mmap granularity


def _windows(count, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=g).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_disk_and_memory_stores_hold_the_same_values(dtype, tmp_path):
    windows = _windows(5, torch.float32)
    stores = [InMemoryActivations(5, SHAPE, dtype), DiskActivations(5, SHAPE, dtype, tmp_path)]
    for store in stores:
        for i, w in enumerate(windows):
            store[i] = w  # stored in the store's dtype
        store[2] = windows[2] * 2  # a slot is overwritten in place, as a block's output replaces its input
    for i, w in enumerate(windows):
        expected = (w * 2 if i == 2 else w).to(dtype)
        for store in stores:
            assert store[i].dtype == dtype and store[i].shape == SHAPE and torch.equal(store[i], expected)
    file = stores[1].path
    assert file.parent == tmp_path and file.exists()
    stores[1].close()
    assert not file.exists()
    with pytest.raises(IndexError):
        stores[0][5]


def test_the_store_goes_to_disk_past_the_budget(tmp_path):
    need = 4 * 37 * 24 * 2
    assert isinstance(activation_store(4, SHAPE, torch.bfloat16, offload_dir=None, budget=need), InMemoryActivations)
    store = activation_store(4, SHAPE, torch.bfloat16, offload_dir=None, fallback_dir=tmp_path, budget=need - 1)
    assert isinstance(store, DiskActivations) and store.path.parent == tmp_path
    store.close()
    store = activation_store(4, SHAPE, torch.bfloat16, offload_dir=tmp_path / "acts")
    assert isinstance(store, DiskActivations) and store.path.parent == tmp_path / "acts"
    store.close()


def test_too_little_disk_space_is_a_clear_error(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(LlmbinError, match="GiB free.*choose another --offload-activations"):
        DiskActivations(4, SHAPE, torch.float32, tmp_path)
