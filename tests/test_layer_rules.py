"""Per-layer rules (``layers``): a linear takes the options of the first rule whose regex its name
contains; the mix is recorded, quantized layer by layer, saved and served like any checkpoint."""
import pytest
import torch

import llmbin
from llmbin.bits import bit_report
from llmbin.config import DBLLMConfig, config_from_dict, make_config
from llmbin.errors import LlmbinError
from tests.conftest import tiny_model

CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
INPUT = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.mlp.down_proj"]


def test_the_first_rule_a_layer_name_matches_sets_its_options():
    config = DBLLMConfig(planes=1, group_size=16, layers=[
        {"match": r"layers\.0\.mlp\.down_proj", "planes": 2, "group_size": 0},
        {"match": "down_proj|v_proj", "planes": 3}])
    chosen = config.layer_configs(NAMES)
    assert chosen[NAMES[0]] is config  # no rule: the run's options
    assert (chosen[NAMES[1]].planes, chosen[NAMES[1]].group_size) == (3, 16)
    assert (chosen[NAMES[2]].planes, chosen[NAMES[2]].group_size) == (2, 0)  # both rules match: the first wins
    assert (chosen[NAMES[3]].planes, chosen[NAMES[3]].group_size) == (3, 16)
    assert all(c.layers == [] for c in chosen.values() if c is not config)


def test_the_rules_are_recorded_only_when_given_and_read_back():
    assert "layers" not in DBLLMConfig().to_dict()  # checkpoints written before rules existed keep their record
    config = DBLLMConfig(planes=1, group_size=16, layers=[{"match": "down_proj", "planes": 2}])
    assert config.to_dict()["layers"] == [{"match": "down_proj", "planes": 2}]
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("rule, message", [
    ("down_proj", r"layers rule 1 must be a mapping with a 'match' regex and options"),
    ({"planes": 2}, r"layers rule 1 must be a mapping with a 'match' regex"),
    ({"match": "mlp.(down"}, r"layers rule 1: match 'mlp.\(down' is not a regular expression"),
    ({"match": "down", "tune": True}, r"layers rule 1 sets tune, which apply to the whole run, not one layer"),
    ({"match": "down", "method": "gptq"}, r"layers rule 1 sets method, which apply to the whole run"),
    ({"match": "down", "bits": 2}, r"layers rule 1 sets unknown option\(s\) for db-llm: bits; valid: percdamp"),
    ({"match": "down", "planes": 9}, r"layers rule 1 \(match 'down'\): --planes must be 1 to 4, got 9"),
    ({"match": "down", "planes": "2"}, r"layers rule 1 \(match 'down'\): option planes must be an integer, got '2'"),
])
def test_a_mistaken_rule_is_refused_by_number(rule, message):
    with pytest.raises(LlmbinError, match=message):
        make_config("db-llm", layers=[rule])


def test_a_rule_that_matches_no_layer_is_refused_before_any_work():
    config = DBLLMConfig(layers=[{"match": "down_proj", "planes": 1}, {"match": "dwn_proj", "planes": 3}])
    with pytest.raises(LlmbinError, match=r"layers rule 2 \(match 'dwn_proj'\) matches no linear layer, so it would do "
                                          r"nothing; the layers are named like model.layers.0.self_attn.q_proj"):
        llmbin.quantize(tiny_model(), config, CALIB, progress=False)


def test_a_mixed_model_quantizes_each_layer_as_its_rule_says_and_loads_to_the_same_outputs(tmp_path):
    from llmbin.nn.binary_linear import BinaryLinear

    config = DBLLMConfig(planes=1, group_size=16, layers=[{"match": "mlp.down_proj|self_attn.v_proj", "planes": 2}])
    model = llmbin.quantize(tiny_model(), config, CALIB, progress=False)
    planes = {name: m.layout["planes"] for name, m in model.named_modules() if isinstance(m, BinaryLinear)}
    assert {n for n, p in planes.items() if p == 2} == {f"model.layers.{i}.{n}" for i in (0, 1)
                                                        for n in ("mlp.down_proj", "self_attn.v_proj")}
    assert sum(p == 1 for p in planes.values()) == 10
    one = bit_report(llmbin.quantize(tiny_model(), DBLLMConfig(planes=1, group_size=16), CALIB, progress=False))
    two = bit_report(llmbin.quantize(tiny_model(), DBLLMConfig(planes=2, group_size=16), CALIB, progress=False))
    mixed = bit_report(model)
    assert one["bits_per_weight"] < mixed["bits_per_weight"] < two["bits_per_weight"]
    by_layer = {name: kind["bits_per_weight"] for name, kind in mixed["by_layer"].items()}
    assert by_layer["mlp.down_proj"] == two["by_layer"]["mlp.down_proj"]["bits_per_weight"]  # a rule's layers cost
    assert by_layer["mlp.gate_proj"] == one["by_layer"]["mlp.gate_proj"]["bits_per_weight"]  # what a uniform run's do
    assert sum(kind["weights"] for kind in mixed["by_layer"].values()) == mixed["quantized_weights"]

    llmbin.save(model, None, tmp_path / "mixed")
    loaded = llmbin.load(tmp_path / "mixed")
    record = loaded.config.quantization_config
    assert (record.method, record.planes, record.layers) == ("db-llm", 1, config.layers)
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, model(INPUT).logits)


def test_the_command_line_takes_rules_as_a_yaml_list():
    from llmbin.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["quantize", "--model", "m", "--method", "db-llm", "--out", "o",
                              "--layers", "[{match: mlp.down_proj, planes: 2, percdamp: 1e-2}]"])
    assert args.layers == [{"match": "mlp.down_proj", "planes": 2, "percdamp": 0.01}]
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--model", "m", "--method", "db-llm", "--out", "o", "--layers", "{match: x}"])
