import copy

import pytest
import torch

import llmbin
from llmbin.distill import dad_loss, deviation_aware_distill
from llmbin.nn.binary_linear import BinaryLinear
from tests.conftest import tiny_model

CALIB = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))


def test_dad_loss_is_zero_for_identical_outputs_and_weights_ambiguous_tokens():
    logits = torch.randn(1, 5, 30)
    assert dad_loss(logits, logits).abs() < 1e-6
    sure, unsure = torch.full((30,), -20.0), torch.zeros(30)
    sure[0] = 20.0
    teacher = torch.stack([sure, unsure])[None]
    off = teacher.clone()
    off[0, :, 1] += 3.0  # the same logit shift on both tokens
    both = dad_loss(teacher, off)
    only_unsure = dad_loss(teacher[:, 1:], off[:, 1:])
    assert both > 0 and torch.isclose(both, only_unsure, rtol=1e-3)  # the confident token does not count


def test_distillation_lowers_the_loss_and_keeps_the_bits():
    teacher = tiny_model("llama")
    config = llmbin.make_config("db-llm")
    student = llmbin.quantize(copy.deepcopy(teacher), config, CALIB, progress=False)
    planes = {n: m.weight.clone() for n, m in student.named_modules() if isinstance(m, BinaryLinear)}

    def loss():
        with torch.no_grad():
            return float(sum(dad_loss(teacher(ids[None]).logits, student(ids[None]).logits) for ids in CALIB))

    before = loss()
    losses = deviation_aware_distill(student, teacher, CALIB, epochs=3, lr=3e-4, progress=False)
    assert len(losses) == 3 * len(CALIB) and loss() < 0.8 * before
    for name, m in student.named_modules():
        if isinstance(m, BinaryLinear):
            assert torch.equal(m.weight, planes[name]) and m.alpha.dtype == torch.float16 and not m.alpha.requires_grad
    assert not any(p.requires_grad for p in student.parameters())


def test_distill_option_runs_in_quantize_and_the_checkpoint_round_trips(tmp_path):
    config = llmbin.make_config("db-llm", distill=True, distill_epochs=1, distill_lr=1e-3)
    model = llmbin.quantize(tiny_model("llama"), config, CALIB, progress=False)
    q = model.config.quantization_config
    assert q.distill is True and q.distill_loss_last >= 0
    llmbin.save(model, None, tmp_path / "ckpt")
    ids = CALIB[:2]
    with torch.no_grad():
        assert torch.equal(llmbin.load(tmp_path / "ckpt")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("options", [{"distill_epochs": 0}, {"distill_lr": 0.0}])
def test_bad_distill_options_are_rejected(options):
    with pytest.raises(llmbin.LlmbinError, match="distill"):
        llmbin.make_config("db-llm", **options)


@pytest.mark.parametrize("method", ["pb-llm", "gptq"])
def test_distillation_is_a_stage_any_method_can_use(method):
    config = llmbin.make_config(method, distill=True, distill_epochs=1, distill_lr=1e-3)
    assert config.wants_distillation()
    model = llmbin.quantize(tiny_model("llama"), config, CALIB, progress=False)
    q = model.config.quantization_config
    assert q.method == method and q.distill is True and q.distill_loss_last >= 0


def test_the_distillation_options_are_refused_for_any_method():
    with pytest.raises(llmbin.LlmbinError, match="--distill-epochs must be >= 1"):
        llmbin.make_config("rtn-sign", distill=True, distill_epochs=0)
    assert not llmbin.make_config("rtn-sign").wants_distillation()
