import pytest
import torch

import llmbin
from llmbin.driver import quantize_blocks
from llmbin.errors import LlmbinError
from llmbin.models import decoder_layers
from llmbin.nn import BinaryLinear
from tests.conftest import tiny_model

CALIB = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "opt"])
def test_every_block_linear_is_packed_and_the_model_still_runs(kind):
    model = tiny_model(kind)
    linears_before = sum(isinstance(m, torch.nn.Linear) for b in decoder_layers(model) for m in b.modules())
    llmbin.quantize(model, llmbin.PBLLMConfig(), CALIB, progress=False)
    blocks = decoder_layers(model)
    assert sum(isinstance(m, BinaryLinear) for b in blocks for m in b.modules()) == linears_before
    assert not any(isinstance(m, torch.nn.Linear) for b in blocks for m in b.modules())
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # lm_head stays float
    logits = model(CALIB[:1]).logits
    assert torch.isfinite(logits).all()


def test_quantized_outputs_are_propagated_to_the_next_block():
    """Block 1's Hessian must come from block 0's *quantized* outputs, not the float ones."""
    model = tiny_model("llama")
    seen = []
    block1 = decoder_layers(model)[1]
    block1.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
                                     with_kwargs=True)
    float_model = tiny_model("llama")
    with torch.no_grad():
        float_in = []
        decoder_layers(float_model)[1].register_forward_pre_hook(
            lambda m, a, k: float_in.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
        float_model(CALIB[:1])
    llmbin.quantize(model, llmbin.PBLLMConfig(), CALIB, progress=False)
    assert not torch.allclose(seen[0], float_in[0])  # the Hessian pass of block 1 saw quantized inputs


def test_resume_after_interruption_gives_the_same_model(tmp_path):
    config = llmbin.PBLLMConfig()
    reference = llmbin.quantize(tiny_model(), config, CALIB, progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(index, modules):
        store_save(index, modules)
        raise Stop

    from llmbin.resume import BlockStore

    store = BlockStore(tmp_path / "work", {"test": 1})
    store_save = store.save
    with pytest.raises(Stop):
        quantize_blocks(tiny_model(), config, CALIB, on_block_done=stop_after_first, progress=False)
    assert (tmp_path / "work" / "block_00000.safetensors").exists()
    assert not (tmp_path / "work" / "block_00001.safetensors").exists()
    done = store.load()
    resumed = tiny_model()
    quantize_blocks(resumed, config, CALIB, done=done, on_block_done=store.save, progress=False)
    llmbin.checkpoint.round_to_storage(resumed)
    assert torch.equal(resumed(CALIB[:1]).logits, reference(CALIB[:1]).logits)


def test_a_run_with_other_options_does_not_resume_silently(tmp_path):
    from llmbin.resume import BlockStore

    BlockStore(tmp_path, {"salient_frac": 0.1})
    with pytest.raises(LlmbinError, match="other options"):
        BlockStore(tmp_path, {"salient_frac": 0.2})


def test_nan_weights_get_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        decoder_layers(model)[0].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(LlmbinError, match="NaN or infinite weights"):
        llmbin.quantize(model, llmbin.PBLLMConfig(), CALIB, progress=False)


def test_calibration_must_be_token_ids():
    with pytest.raises(LlmbinError, match="LongTensor"):
        llmbin.quantize(tiny_model(), llmbin.PBLLMConfig(), CALIB.float(), progress=False)


def test_model_without_decoder_blocks_is_unsupported():
    class Flat(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 2})()

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(LlmbinError, match="unsupported architecture"):
        decoder_layers(Flat())
