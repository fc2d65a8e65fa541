"""The end-to-end pass (``--e2e-steps``): it moves only what is continuous, it brings the quantized
model's next-token distribution closer to the float model's on windows it did not see, and its
checkpoint saves, loads and resumes exactly."""
import copy

import pytest
import torch

import llmbin
from llmbin.config import config_from_dict
from llmbin.e2e_tuning import final_norm, float_final_states, kl_backward, tune_end_to_end
from llmbin.models import decoder_layers, open_model
from llmbin.nn.binary_linear import BinaryLinear
from llmbin.quantize import quantize_and_save
from tests.conftest import interrupt_after_first_block, tiny_model
from tests.test_block_tuning import DISCRETE
from tests.test_quantize import INPUT, _assert_same_checkpoint

TRAIN = torch.randint(0, 300, (16, 128), generator=torch.Generator().manual_seed(3))
HELD_OUT = torch.randint(0, 300, (4, 128), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def _kl(model, windows, targets) -> float:
    """Mean per-token KL of ``model`` from the float states ``targets``, as the pass computes it."""
    total = 0.0
    for ids, target in zip(windows, targets):
        with torch.enable_grad():
            hidden = model.base_model(ids[None], use_cache=False).last_hidden_state[0].detach().requires_grad_(True)
            total += kl_backward(hidden, target, model.get_output_embeddings())
    return total / len(windows)


@pytest.fixture(scope="module")
def quantized_pair():
    """A tiny Qwen2 (q/k/v biases) and PB-LLM's (salient positions) packing of it, with the float states."""
    float_model = tiny_model("qwen2")
    states = float_final_states(float_model, TRAIN, "cpu"), float_final_states(float_model, HELD_OUT, "cpu")
    packed = llmbin.quantize(copy.deepcopy(float_model), llmbin.make_config("pb-llm"), TRAIN, progress=False)
    return packed, states


def test_the_pass_keeps_every_discrete_choice_and_lowers_the_held_out_kl(quantized_pair):
    packed, (train_states, held_states) = quantized_pair
    model = copy.deepcopy(packed)
    before = {f"{name}.{key}": t.clone() for name, m in model.named_modules() if isinstance(m, BinaryLinear)
              for key, t in m.state_dict().items() if key in DISCRETE}
    assert any(n.endswith("salient_positions") for n in before)
    embedding = model.get_input_embeddings().weight.clone()
    kl = _kl(model, HELD_OUT, held_states)
    report = tune_end_to_end(model, TRAIN, train_states, steps=32, lr=1e-2, device="cpu", progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())  # signs, masks, positions, codes: bit-identical
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # not tuned
    assert _kl(model, HELD_OUT, held_states) < 0.95 * kl  # 0.92 here: a random tiny model has little to recover
    assert report["e2e_kl_last"] < report["e2e_kl_first"]
    changed = [n for n, t in after.items() if not torch.equal(t, packed.state_dict()[n])]
    assert final_norm(model) is not None and "model.norm.weight" in changed  # the final norm is tuned too
    assert any(n.endswith(".alpha") for n in changed) and any(n.endswith(".salient_scale") for n in changed)
    for m in model.modules():  # stored as the checkpoint holds them, frozen, and out of training mode
        if isinstance(m, BinaryLinear):
            assert m.alpha.dtype == torch.float16 and not m.alpha.requires_grad
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(block.training or block.gradient_checkpointing for block in decoder_layers(model))


def test_the_pass_runs_with_meta_as_the_default_device(quantized_pair):
    packed, (train_states, _) = quantized_pair
    expected, model = copy.deepcopy(packed), copy.deepcopy(packed)
    tune_end_to_end(expected, TRAIN, train_states, steps=2, lr=1e-2, device="cpu", progress=False)
    with torch.device("meta"):
        tune_end_to_end(model, TRAIN, train_states, steps=2, lr=1e-2, device="cpu", progress=False)
    state, reference = model.state_dict(), expected.state_dict()
    assert all(t.device.type == "cpu" and torch.equal(t, reference[n]) for n, t in state.items())


def test_a_checkpoint_with_the_pass_gives_the_in_memory_logits_and_records_it(tmp_path):
    config = llmbin.make_config("db-llm", tune=True, tune_steps=2, e2e_steps=3)
    model = llmbin.quantize(tiny_model("llama"), config, TRAIN[:4], progress=False)
    recorded = model.config.quantization_config
    assert recorded.e2e_steps == 3 and recorded.e2e_lr == config.e2e_lr and recorded.e2e_kl_last >= 0
    llmbin.save(model, None, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(llmbin.load(tmp_path / "ckpt")(INPUT).logits, model(INPUT).logits)
    without = llmbin.quantize(tiny_model("llama"), llmbin.make_config("db-llm", tune=True, tune_steps=2), TRAIN[:4],
                              progress=False)
    with torch.no_grad():
        assert not torch.equal(without(INPUT).logits, model(INPUT).logits)


def test_a_run_without_the_pass_records_what_it_did_before_the_pass_existed():
    assert not any(k.startswith("e2e") for k in llmbin.make_config("pb-llm").to_dict())
    with_pass = llmbin.make_config("pb-llm", e2e_steps=8, e2e_lr=3e-3).to_dict()
    assert config_from_dict(with_pass).to_dict() == with_pass


@pytest.mark.parametrize("options,message", [({"e2e_steps": -1}, "--e2e-steps must be >= 0"),
                                             ({"e2e_steps": 4, "e2e_lr": 0.0}, "--e2e-lr > 0"),
                                             ({"e2e_steps": 1.5}, "e2e_steps")])
def test_bad_pass_options_are_refused_by_name(options, message):
    with pytest.raises(llmbin.LlmbinError, match=message):
        llmbin.make_config("pb-llm", **options)


def test_the_pass_and_distillation_are_not_combined():
    with pytest.raises(llmbin.LlmbinError, match="choose one"):
        llmbin.quantize(tiny_model("llama"), llmbin.make_config("db-llm", distill=True, e2e_steps=2), TRAIN[:2],
                        progress=False)


def test_a_model_without_a_known_final_norm_is_refused_before_any_work():
    model = tiny_model("llama")
    del model.model.norm  # e.g. GPT-2's is ln_f: its float targets would miss the norm
    with pytest.raises(llmbin.LlmbinError, match="needs the norm after the last block"):
        llmbin.quantize(model, llmbin.make_config("pb-llm", e2e_steps=2), TRAIN[:2], progress=False)


@pytest.fixture(scope="module")
def streamed_with_pass(tiny_sharded_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "ckpt"
    quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(**WITH_PASS), TRAIN[:4], out,
                      progress=False)
    return out


WITH_PASS = dict(tune=True, tune_steps=2, e2e_steps=3)


def test_a_streamed_run_with_the_pass_gives_the_whole_models_checkpoint(tiny_sharded_dir, streamed_with_pass,
                                                                         tmp_path):
    quantize_and_save(open_model(str(tiny_sharded_dir), whole=True), llmbin.PBLLMConfig(**WITH_PASS), TRAIN[:4],
                      tmp_path / "whole", progress=False)
    _assert_same_checkpoint(streamed_with_pass, tmp_path / "whole")
    without = tmp_path / "without"
    quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(tune=True, tune_steps=2), TRAIN[:4],
                      without, progress=False)
    with pytest.raises(AssertionError):
        _assert_same_checkpoint(streamed_with_pass, without)


def test_a_run_with_the_pass_interrupted_and_resumed_gives_the_uninterrupted_checkpoint(tiny_sharded_dir,
                                                                                      streamed_with_pass, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "ckpt"
    with interrupt_after_first_block(monkeypatch), pytest.raises(KeyboardInterrupt):
        quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(**WITH_PASS), TRAIN[:4], out,
                          progress=False)
    quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(**WITH_PASS), TRAIN[:4], out,
                      progress=False)
    _assert_same_checkpoint(streamed_with_pass, out)
