"""The block-wise tuning stage (``--tune``): it moves only what is continuous, it lowers the block's
output error on windows it did not see, and a tuned run saves, loads, streams and resumes exactly."""
import copy

import pytest
import torch

import llmbin
from llmbin.activations import InMemoryActivations
from llmbin.block_tuning import block_error, tune_block
from llmbin.config import config_from_dict
from llmbin.driver import _quantize_block, _run_block, capture_block_inputs
from llmbin.models import decoder_layers, open_model
from llmbin.nn.binary_linear import BinaryLinear
from llmbin.placement import Placement
from llmbin.quantize import quantize_and_save
from tests.conftest import interrupt_after_first_block, tiny_model
from tests.test_quantize import INPUT, _assert_same_checkpoint

CALIB = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
# block 0 of a tiny model tuned on 4096 tokens and checked on 1024 others (on fewer it overfits)
TRAIN = torch.randint(0, 300, (32, 128), generator=torch.Generator().manual_seed(3))
HELD_OUT = torch.randint(0, 300, (8, 128), generator=torch.Generator().manual_seed(5))
SETTINGS = [("db-llm", {}), ("db-llm", {"rotate": "input"}), ("pb-llm", {}), ("billm", {}), ("arb-rc", {}),
            ("gptq", {"bits": 2, "group_size": 16})]
DISCRETE = ("weight", "column_mask", "salient_positions", "salient_magnitudes")


@torch.no_grad()
def _stream(model, windows):
    """Block 0's inputs for ``windows``, and the float block 0's outputs (the tuning targets)."""
    inputs, kwargs = capture_block_inputs(model, windows, Placement("cpu", None), dtype=torch.float32)
    targets = InMemoryActivations(len(inputs), inputs.shape, inputs.dtype)
    for i in range(len(inputs)):
        targets[i] = inputs[i]
    _run_block(decoder_layers(model)[0], targets, kwargs, "cpu", torch.float32, write_back=True)
    return inputs, targets, kwargs


@pytest.fixture(scope="module")
def block_problem():
    model = tiny_model("qwen2")  # q/k/v biases: tuned too
    return model, _stream(model, TRAIN), _stream(model, HELD_OUT)


@torch.no_grad()  # as the driver runs it
def _packed_block(block_problem, method, options):
    model, (inputs, _, kwargs), _ = block_problem
    config = llmbin.make_config(method, **options)
    block = copy.deepcopy(decoder_layers(model)[0])
    _quantize_block(block, inputs, kwargs, lambda _: config, "cpu", torch.float32, 0)
    return block


@pytest.mark.parametrize("method,options", SETTINGS)
def test_tuning_keeps_every_discrete_choice_and_lowers_the_held_out_error(block_problem, method, options):
    _, (inputs, targets, kwargs), (held_in, held_out, _) = block_problem
    block = _packed_block(block_problem, method, options)
    before = {f"{name}.{key}": t.clone() for name, m in block.named_modules() if isinstance(m, BinaryLinear)
              for key, t in m.state_dict().items() if key in DISCRETE}
    assert any(n.endswith("salient_positions") for n in before) or method != "pb-llm"
    error = block_error(block, held_in, held_out, kwargs, device="cpu")
    report = tune_block(block, inputs, targets, kwargs, steps=32, batch=2, lr=1e-2, device="cpu")
    after = block.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())  # signs, masks, positions, codes: bit-identical
    assert block_error(block, held_in, held_out, kwargs, device="cpu") < 0.97 * error
    assert report["loss_last"] < report["loss_first"]
    for m in block.modules():  # stored as the checkpoint holds them, and frozen
        if isinstance(m, BinaryLinear):
            assert m.alpha.dtype == torch.float16 and not m.alpha.requires_grad
    assert not any(p.requires_grad for p in block.parameters())
    assert all(torch.equal(p, p.to(torch.float16).to(p.dtype)) for p in block.parameters())


def test_tuning_runs_with_meta_as_the_default_device(block_problem):
    _, (inputs, targets, kwargs), _ = block_problem
    block = _packed_block(block_problem, "pb-llm", {})
    expected = copy.deepcopy(block)
    tune_block(expected, inputs, targets, kwargs, steps=3, batch=1, lr=1e-2, device="cpu")
    with torch.device("meta"):
        tune_block(block, inputs, targets, kwargs, steps=3, batch=1, lr=1e-2, device="cpu")
    state, reference = block.state_dict(), expected.state_dict()
    assert all(t.device.type == "cpu" and torch.equal(t, reference[n]) for n, t in state.items())


def test_a_tuned_checkpoint_gives_the_in_memory_logits_and_records_the_options(tmp_path):
    config = llmbin.make_config("db-llm", tune=True, tune_steps=4)
    model = llmbin.quantize(tiny_model("qwen2"), config, CALIB, progress=False)
    recorded = model.config.quantization_config
    assert recorded.tune is True and recorded.tune_steps == 4 and recorded.tune_lr == config.tune_lr
    llmbin.save(model, None, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(llmbin.load(tmp_path / "ckpt")(INPUT).logits, model(INPUT).logits)
    untuned = llmbin.quantize(tiny_model("qwen2"), llmbin.make_config("db-llm"), CALIB, progress=False)
    with torch.no_grad():
        assert not torch.equal(untuned(INPUT).logits, model(INPUT).logits)


def test_an_untuned_run_records_what_it_did_before_tuning_existed():
    # the resume fingerprint and the checkpoint's record of an untuned run do not change
    assert not any(k.startswith("tune") for k in llmbin.make_config("pb-llm").to_dict())
    tuned = llmbin.make_config("pb-llm", tune=True, tune_lr=3e-3).to_dict()
    assert config_from_dict(tuned).to_dict() == tuned


@pytest.mark.parametrize("options", [{"tune_steps": 0}, {"tune_batch": 0}, {"tune_lr": 0.0}, {"tune_steps": 1.5}])
def test_bad_tuning_options_are_refused_by_name(options):
    with pytest.raises(llmbin.LlmbinError, match="tune"):
        llmbin.make_config("pb-llm", tune=True, **options)


TUNED = dict(tune=True, tune_steps=3)


@pytest.fixture(scope="module")
def tuned_streamed(tiny_sharded_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "ckpt"
    quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(**TUNED), CALIB, out, progress=False)
    return out


def test_a_streamed_tuned_run_gives_the_whole_models_checkpoint(tiny_sharded_dir, tuned_streamed, tmp_path):
    quantize_and_save(open_model(str(tiny_sharded_dir), whole=True), llmbin.PBLLMConfig(**TUNED), CALIB,
                      tmp_path / "whole", progress=False)
    _assert_same_checkpoint(tuned_streamed, tmp_path / "whole")


def test_a_tuned_run_interrupted_and_resumed_gives_the_uninterrupted_checkpoint(tiny_sharded_dir, tuned_streamed,
                                                                               tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    with interrupt_after_first_block(monkeypatch), pytest.raises(KeyboardInterrupt):
        quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(**TUNED), CALIB, out, progress=False)
    assert (tmp_path / "ckpt.partial" / "block_00000.safetensors").is_file()
    quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(**TUNED), CALIB, out, progress=False)
    _assert_same_checkpoint(tuned_streamed, out)


def test_a_resume_refuses_other_tuning_options(tiny_sharded_dir, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    with interrupt_after_first_block(monkeypatch), pytest.raises(KeyboardInterrupt):
        quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(**TUNED), CALIB, out, progress=False)
    with pytest.raises(llmbin.LlmbinError, match="tune_steps"):
        quantize_and_save(open_model(str(tiny_sharded_dir)), llmbin.PBLLMConfig(tune=True, tune_steps=5), CALIB, out,
                          progress=False)
