import pytest
import torch

import llmbin
from llmbin.config import make_config
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

    from llmbin.checkpoint.resume import BlockStore

    store = BlockStore(tmp_path / "work", {"test": 1})
    store_save = store.save
    with pytest.raises(Stop):
        quantize_blocks(tiny_model(), config, CALIB, on_block_done=stop_after_first, progress=False)
    assert (tmp_path / "work" / "block_00000.safetensors").exists()
    assert not (tmp_path / "work" / "block_00001.safetensors").exists()
    done = store.finished()
    resumed = tiny_model()
    quantize_blocks(resumed, config, CALIB, done=done, on_block_done=store.save, progress=False)
    llmbin.checkpoint.io.round_to_storage(resumed)
    assert torch.equal(resumed(CALIB[:1]).logits, reference(CALIB[:1]).logits)


def test_a_run_with_other_options_does_not_resume_silently(tmp_path):
    from llmbin.checkpoint.resume import BlockStore, block_path

    BlockStore(tmp_path, {"salient_frac": 0.1})
    BlockStore(tmp_path, {"salient_frac": 0.2})  # no finished block yet: nothing to mix, the new run takes over
    block_path(tmp_path, 0).write_bytes(b"")  # a finished block of the 0.2 run
    with pytest.raises(LlmbinError, match=r"another run \(salient_frac: 0.2 then, 0.3 now\)"):
        BlockStore(tmp_path, {"salient_frac": 0.3})


def test_nan_weights_get_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        decoder_layers(model)[0].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(LlmbinError, match="^model.layers.0.mlp.up_proj.weight has NaN or infinite values"):
        llmbin.quantize(model, llmbin.PBLLMConfig(), CALIB, progress=False)


@pytest.mark.parametrize("rotate", ["input", "both"])
def test_a_size_that_cannot_be_rotated_is_refused_before_calibration(rotate, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config()
    config.intermediate_size = 2 * 4099  # odd factor over MAX_ODD_FACTOR: down_proj's input cannot be rotated
    model = AutoModelForCausalLM.from_config(config).eval()
    monkeypatch.setattr("llmbin.driver.capture_block_inputs", lambda *a, **k: pytest.fail("calibration started"))
    with pytest.raises(LlmbinError, match=rf"--rotate {rotate}: model.layers.0.mlp.*size 8198, which cannot be "
                                          r"rotated \(.*odd factor 4099.*; use --rotate none$"):
        llmbin.quantize(model, make_config("db-llm", rotate=rotate), CALIB, progress=False)


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


@pytest.mark.parametrize("method", ["pb-llm", "arb-rc"])
def test_the_driver_runs_with_meta_as_the_default_device(method):
    """See tests/algorithms/test_device_hygiene.py: a stray factory call would make a meta tensor."""
    config = make_config(method, blocksize=32)
    expected = llmbin.quantize(tiny_model(), config, CALIB, progress=False)
    model = tiny_model()
    with torch.device("meta"):
        got = llmbin.quantize(model, config, CALIB, progress=False)
    assert all(t.device.type == "cpu" for t in got.state_dict().values())
    with torch.no_grad():
        assert torch.equal(got(CALIB).logits, expected(CALIB).logits)


def test_a_streamed_model_has_only_the_current_block_in_memory(tiny_sharded_dir, tmp_path):
    """Inside block i, every other block's weights are on the meta device, or packed there."""
    from llmbin.models import open_model

    opened = open_model(str(tiny_sharded_dir))
    model = opened.model
    assert all(t.is_meta for t in model.state_dict().values())
    blocks = decoder_layers(model)
    seen = []

    def check(index):
        def hook(_module, _args, _kwargs, _output):  # after the block ran (the capture pass stops before it)
            for j, block in enumerate(blocks):
                for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
                    if j != index:
                        assert tensor.is_meta, (index, j, name)
                    elif not isinstance(block.get_submodule(name.rpartition(".")[0]), BinaryLinear):
                        assert not tensor.is_meta, (index, name)
            assert model.get_input_embeddings().weight.is_meta and model.get_output_embeddings().weight.is_meta
            seen.append(index)
        return hook

    for i, block in enumerate(blocks):
        block.register_forward_hook(check(i), with_kwargs=True)
    llmbin.quantize(model, llmbin.PBLLMConfig(), CALIB, weights=opened.weights, work_dir=tmp_path / "work",
                    progress=False)
    assert sorted(set(seen)) == [0, 1]  # each block ran (Hessian pass and propagation) while checked
    assert sum(isinstance(m, BinaryLinear) for m in model.modules()) == 14
    assert all(t.is_meta for t in model.state_dict().values())  # released: the blocks are on disk only
    assert len(list((tmp_path / "work").glob("block_*.safetensors"))) == 2


def test_a_streamed_model_without_a_work_dir_is_refused(tiny_sharded_dir):
    from llmbin.models import open_model

    opened = open_model(str(tiny_sharded_dir))
    with pytest.raises(LlmbinError, match="work_dir"):
        llmbin.quantize(opened.model, llmbin.PBLLMConfig(), CALIB, weights=opened.weights, progress=False)


@pytest.mark.parametrize("method,options", [("pb-llm", {}), ("db-llm", {"rotate": "input"}),
                                            ("billm", {"blocksize": 32, "refine_iters": 15, "refit_scales": True})])
def test_the_driver_applies_the_refit_stage_around_the_method(method, options, monkeypatch):
    """Every layer is the method's fit followed by the refit, in the rotated basis if any, exactly as
    each method refitted inside its own function before the refit was a stage."""
    import llmbin.driver as driver
    from llmbin.algorithms.hessian import damped_hessian, prepared_inverse
    from llmbin.algorithms.incoherence import rotate_problem
    from llmbin.algorithms.scales import refit_scales
    from llmbin.registry import method_function

    calls = []
    original = driver.quantize_layer

    def record(method_fn, W, H, config, rotation=None):
        calls.append((W.clone(), H.clone(), rotation, original(method_fn, W, H, config, rotation)))
        return calls[-1][-1]

    monkeypatch.setattr(driver, "quantize_layer", record)
    config = make_config(method, **options)
    llmbin.quantize(tiny_model(), config, CALIB[:2], progress=False)
    assert len(calls) == 14  # 7 linears in each of the 2 blocks
    for W, H, rotation, packed in calls:
        if rotation is not None:
            W, H = rotate_problem(W, H, rotation)
        fitted = method_function(config)(W, H, config)
        inline = refit_scales(fitted, prepared_inverse(W.float(), H.float(), config.percdamp)[0],
                              damped_hessian(H.float(), config.percdamp))
        assert torch.equal(packed.alpha, inline.alpha) and torch.equal(packed.planes, inline.planes)
        assert (packed.mu is None and inline.mu is None) or torch.equal(packed.mu, inline.mu)
        assert not torch.equal(packed.alpha, fitted.alpha)  # the stage ran


@pytest.mark.parametrize("rotate", ["none", "input"])
def test_a_layers_own_hessian_is_not_kept_by_the_driver_while_its_method_runs(rotate, monkeypatch):
    """Rotated, the method works on a new H: the driver must not keep the original alive beside it
    (a 70B down_proj's is 3.3 GB). Unrotated, the method's H is the original itself."""
    from torch.multiprocessing.reductions import StorageWeakRef

    import llmbin.driver as driver

    real, seen = driver.quantize_layer, []

    def spy(method, W, H, config, rotation):
        original, handed = StorageWeakRef(H.untyped_storage()), [H]
        del H

        def checked(W2, H2, config2):
            seen.append(original.expired())
            return method(W2, H2, config2)
        return real(checked, W, handed.pop(), config, rotation)

    monkeypatch.setattr(driver, "quantize_layer", spy)
    model = tiny_model("llama")
    llmbin.quantize(model, llmbin.PBLLMConfig(rotate=rotate), CALIB, progress=False)
    blocks = len(decoder_layers(model))
    # q, k, v share one H, and gate, up another: each is freed with its last layer; o_proj's and down_proj's are their own
    assert seen.count(True) == (0 if rotate == "none" else 4 * blocks), seen
