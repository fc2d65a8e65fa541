"""``quantize_and_save``: a model streamed from its shards gives the checkpoint the whole model gives,
and activations offloaded to disk give the results kept in memory."""
import pytest
import torch
from safetensors import safe_open

import llmbin
from llmbin.checkpoint.shards import shard_files
from llmbin.models import open_model
from llmbin.quantize import quantize_and_save

CALIB = torch.randint(0, 300, (4, 40), generator=torch.Generator().manual_seed(0))
INPUT = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))


def _tensors(folder):
    out = {}
    for name, file in shard_files(folder).items():
        with safe_open(str(file), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _assert_same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    with torch.no_grad():
        assert torch.equal(llmbin.load(a)(INPUT).logits, llmbin.load(b)(INPUT).logits)


@pytest.fixture(scope="module")
def streamed(tiny_sharded_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("streamed") / "ckpt"
    opened = open_model(str(tiny_sharded_dir))
    assert opened.streamed and opened.stored_dtype == torch.bfloat16 and opened.dtype == torch.float32
    quantize_and_save(opened, llmbin.PBLLMConfig(), CALIB, out, progress=False)
    return out


def test_streamed_and_whole_models_give_the_same_checkpoint(tiny_sharded_dir, streamed, tmp_path):
    whole = open_model(str(tiny_sharded_dir), whole=True)
    assert not whole.streamed and whole.stored_dtype == torch.bfloat16
    quantize_and_save(whole, llmbin.PBLLMConfig(), CALIB, tmp_path / "whole", progress=False)
    _assert_same_checkpoint(streamed, tmp_path / "whole")
    assert not (tmp_path / "whole.partial").exists()


@pytest.mark.parametrize("how", ["folder", "budget"])
def test_offloaded_activations_give_identical_results(tiny_sharded_dir, streamed, tmp_path, how, monkeypatch):
    import llmbin.activations

    stores = []
    original = llmbin.activations.activation_store
    monkeypatch.setattr("llmbin.driver.activation_store",
                        lambda *a, **k: stores.append(original(*a, **k)) or stores[-1])
    options = {"offload_activations": tmp_path / "acts"} if how == "folder" else {"activation_budget": 0}
    quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(), CALIB, tmp_path / "ckpt",
                      progress=False, **options)
    assert isinstance(stores[0], llmbin.activations.DiskActivations)
    assert stores[0].dtype == torch.bfloat16 and stores[0].fd is None  # 16-bit, and the file is gone
    if how == "folder":
        assert list((tmp_path / "acts").iterdir()) == []
    _assert_same_checkpoint(streamed, tmp_path / "ckpt")


def test_streamed_checkpoint_is_sharded_when_large(tiny_sharded_dir, streamed, tmp_path):
    quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(), CALIB, tmp_path / "ckpt", progress=False,
                      max_shard_bytes=30_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "ckpt").glob("model-0000*-of-0000*.safetensors"))) > 1
    _assert_same_checkpoint(streamed, tmp_path / "ckpt")


def test_resume_refuses_another_dtype(tiny_sharded_dir, tmp_path, monkeypatch):
    from llmbin.errors import LlmbinError
    from tests.conftest import interrupt_after_first_block

    out = tmp_path / "ckpt"
    with interrupt_after_first_block(monkeypatch), pytest.raises(KeyboardInterrupt):
        quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(), CALIB, out, progress=False)
    with pytest.raises(LlmbinError, match="another run"):  # a resume never mixes float32 and bfloat16 blocks
        quantize_and_save(open_model(str(tiny_sharded_dir), dtype="bfloat16"), llmbin.PBLLMConfig(), CALIB, out,
                          progress=False)


def test_calibration_windows_longer_than_the_models_positions_are_refused():
    from llmbin.errors import LlmbinError
    from tests.conftest import tiny_model

    long = torch.randint(0, 300, (2, 257))
    with pytest.raises(LlmbinError, match=r"^--seqlen 257 is longer than the model's 256 positions"):
        llmbin.quantize(tiny_model(), llmbin.PBLLMConfig(), long, progress=False)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_calibration_ids_past_the_embedding_are_refused(kind):
    from llmbin.errors import LlmbinError
    from tests.conftest import tiny_model

    calibration = torch.randint(0, 300, (2, 32))
    calibration[1, 3] = 512  # a tokenizer with a larger vocabulary than the model's
    with pytest.raises(LlmbinError, match="token id 512, but the model's embedding has 300 rows"):
        llmbin.quantize(tiny_model(kind), llmbin.PBLLMConfig(), calibration, progress=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_streamed_gguf_gives_the_checkpoint_of_its_whole_load(tiny_gguf_files, tmp_path, kind):
    """F16 Llama with llama.cpp's q/k permutation; Q8_0 Qwen2 with biases and its own output matrix."""
    path = str(tiny_gguf_files[kind])
    streamed = open_model(path)
    whole = open_model(path, whole=True)
    assert streamed.streamed and not whole.streamed and streamed.dtype == whole.dtype == torch.float32
    quantize_and_save(streamed, llmbin.PBLLMConfig(), CALIB, tmp_path / "streamed", progress=False)
    quantize_and_save(whole, llmbin.PBLLMConfig(), CALIB, tmp_path / "whole", progress=False)
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole")
    if kind == "qwen2":  # the head is the file's output matrix, not the embedding
        tensors = _tensors(tmp_path / "streamed")
        assert "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"],
                                                               tensors["model.embed_tokens.weight"])
