"""The random layouts that time decode speed have exactly the layout of the recipe they are named after."""
import pytest
import torch
from layout_speed import LAYOUTS, random_layout

from llmbin.bits import bit_report
from llmbin.nn import BinaryLinear
from llmbin.quantize import quantize
from llmbin.recipes import recipe_config
from tests.conftest import tiny_untied_qwen2


def _layouts(model):
    return {name: (m.packed().planes.shape[0], m.packed().group_size, m.packed().mu is not None,
                   m.packed().rotation is not None and m.packed().rotation.output_seed is None,
                   m.packed().salient and (m.packed().salient.count, m.packed().salient.bits),
                   m.packed().storage_bits())
            for name, m in model.named_modules() if isinstance(m, BinaryLinear)}


@pytest.mark.parametrize("layout, recipe, options", [
    ("binary-g64", "binary-g64-rotated", {"rotate": "none"}), ("binary-g64-rotated", "binary-g64-rotated", {}),
    ("db-llm-fdb", "db-llm-fdb", {}), ("db-llm-fdb-rotate-input", "db-llm-fdb", {"rotate": "input"}),
    ("pb-llm-10", "pb-llm-10", {}), ("sign-per-row", "rtn-sign", {})])
def test_a_random_layout_stores_what_its_recipe_stores(layout, recipe, options):
    # every layout is checked against a recipe here: a new one needs its row above
    assert set(LAYOUTS) == {"binary-g64", "binary-g64-rotated", "db-llm-fdb", "db-llm-fdb-rotate-input", "pb-llm-10",
                            "sign-per-row"}
    calibration = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    fitted = quantize(tiny_untied_qwen2(), recipe_config(recipe, **options), calibration, progress=False)
    model = tiny_untied_qwen2()
    biases = {n: m.bias.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
              and ".layers." in n}
    assert random_layout(model, layout) == 14  # 2 blocks of 7 linears
    ours, theirs = _layouts(model), _layouts(fitted)
    # planes, groups, mean, rotation and salient count per layer
    assert {n: v[:-1] for n, v in ours.items()} == {n: v[:-1] for n, v in theirs.items()}
    if LAYOUTS[layout][4]:  # the salient positions' stream: its length depends on where they fall
        assert bit_report(model)["bits_per_weight"] == pytest.approx(bit_report(fitted)["bits_per_weight"], rel=0.02)
    else:  # and the stored bits, exactly
        assert ours == theirs
        assert bit_report(model)["bits_per_weight"] == bit_report(fitted)["bits_per_weight"]
    for name, bias in biases.items():  # q/k/v biases kept
        assert torch.equal(model.get_submodule(name).bias, bias)
    assert torch.isfinite(model(calibration).logits).all()
