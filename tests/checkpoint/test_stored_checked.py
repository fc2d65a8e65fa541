"""``stored_checked``: a float tensor narrowed to the checkpoint's storage dtype in chunks, overflow refused by name."""
import pytest
import torch

import llmbin
from llmbin.checkpoint import tensors
from llmbin.checkpoint.tensors import STORAGE_DTYPE, stored_checked
from llmbin.errors import LlmbinError
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(tensors, "NARROWING_CHUNK", 7)  # every tensor below crosses chunk boundaries


@pytest.mark.parametrize("value", [torch.randn(13, 9), torch.randn(9, 13).t(), torch.tensor(2.5), torch.empty(0, 3),
                                   torch.randn(31).bfloat16(), torch.tensor([float("inf"), 1.0, -float("inf")])],
                         ids=["matrix", "transposed", "scalar", "empty", "bf16", "already infinite"])
def test_it_is_exactly_the_whole_tensor_conversion(value):
    stored = stored_checked("t", value)
    assert stored.dtype == STORAGE_DTYPE and stored.shape == value.shape
    assert torch.equal(stored, value.to(STORAGE_DTYPE))


@pytest.mark.parametrize("value", [torch.randint(0, 9, (5,), dtype=torch.uint8), torch.randn(4).half()],
                         ids=["packed codes", "already stored"])
def test_what_is_stored_as_it_is_comes_back_untouched(value):
    assert stored_checked("t", value) is value


def test_a_finite_value_beyond_the_storage_range_is_refused_by_name():
    value = torch.randn(40)
    value[33] = 1e6  # in the fifth chunk
    with pytest.raises(LlmbinError, match=r"^layer.w has values beyond the float16 range of the checkpoint"):
        stored_checked("layer.w", value)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_such_a_model_is_a_one_line_error_with_nothing_written(tmp_path, tokenizer, streamed):
    from llmbin.models import open_model

    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 2] = 7e4  # fp16's largest is 65504
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    # a whole model fails where it is rounded to what is stored (it would hold inf), a streamed one where it is saved
    opened = open_model(str(tmp_path / "model"), whole=not streamed)
    assert opened.streamed == streamed
    with pytest.raises(LlmbinError, match=r"^model.embed_tokens.weight has values beyond the float16 range"):
        llmbin.quantize_and_save(opened, llmbin.PBLLMConfig(), torch.randint(0, 300, (2, 16)), tmp_path / "ckpt",
                                 progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.partial", "model"]  # finished blocks stay, no checkpoint
