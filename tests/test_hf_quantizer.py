"""Packed checkpoints through plain transformers: ``from_pretrained``, device maps with CPU and disk
offload, ``save_pretrained``, lm-eval from a path, and what happens without ``import llmbin``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import llmbin
from llmbin.errors import LlmbinError
from llmbin.nn.binary_linear import BinaryLinear
from llmbin.nn.half_weights import HalfWeightEmbedding, HalfWeightLinear
from tests.conftest import packed_checkpoint, tiny_model

CALIB = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
INPUT = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
ROOT = Path(__file__).resolve().parents[1]


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])  # tied lm_head; q/k/v biases; untied lm_head
def saved(request, tmp_path_factory, tokenizer):
    return packed_checkpoint(tiny_model(request.param), CALIB, tmp_path_factory.mktemp("ckpt") / request.param, tokenizer)


def test_from_pretrained_gives_the_packed_model_and_llmbin_loads_logits(saved):
    model, out = saved
    loaded = AutoModelForCausalLM.from_pretrained(out)
    linears = [m for m in loaded.model.layers.modules() if isinstance(m, (nn.Linear, BinaryLinear))]
    assert linears and all(isinstance(m, BinaryLinear) for m in linears)
    assert isinstance(loaded.lm_head, HalfWeightLinear) and isinstance(loaded.model.embed_tokens, HalfWeightEmbedding)
    assert loaded.lm_head.weight.dtype == torch.float16 and loaded.model.norm.weight.dtype == torch.float32
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.uint8 and q.alpha.dtype == torch.float16  # packed tensors stay as stored
    assert isinstance(loaded.config.quantization_config, llmbin.LlmbinConfig) and loaded.is_quantized
    assert torch.equal(logits(loaded), logits(llmbin.load(out)))
    assert torch.equal(logits(loaded), logits(model))


def test_float16_on_the_cpu_computes_in_float32_and_bfloat16_is_kept(saved):
    model, out = saved
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"  # the stored dtype: what "auto" picks
    for dtype in ("auto", torch.float16):
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out, dtype=dtype)), logits(model))
    bf16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert bf16.model.norm.weight.dtype == torch.bfloat16 and logits(bf16).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    import transformers

    from tests.conftest import tiny_config

    config = transformers.LlamaConfig(**{**tiny_config("llama").to_dict(), "num_hidden_layers": 6})
    torch.manual_seed(0)
    return packed_checkpoint(AutoModelForCausalLM.from_config(config).eval(), CALIB, tmp_path_factory.mktemp("ckpt") / "six")


def _split(device_map: dict) -> bool:
    blocks = {device for name, device in device_map.items() if ".layers." in name}
    return blocks == {"cpu", "disk"}


def test_device_map_with_cpu_and_disk_offload_gives_equal_logits(six_blocks, tmp_path):
    model, out = six_blocks
    for offload_buffers in (False, True):
        for budget in range(50_000, 200_000, 10_000):  # bytes of "RAM": the smallest that puts some blocks in it
            placed = AutoModelForCausalLM.from_pretrained(out, device_map="auto", max_memory={"cpu": budget},
                                                          offload_folder=tmp_path / f"offload{offload_buffers}",
                                                          offload_buffers=offload_buffers)
            if _split(getattr(placed, "hf_device_map", {})):
                break
        assert _split(placed.hf_device_map), "no memory budget put some blocks on the CPU and others on disk"
        packed_on_disk = any(m.weight.is_meta for m in placed.modules() if isinstance(m, BinaryLinear))
        assert packed_on_disk == offload_buffers  # the packed weights are buffers: on disk with offload_buffers
        assert torch.equal(logits(placed), logits(model))
    # llmbin.load (and llmbin eval --device-map) offloads the packed buffers along with the rest of a block
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  **{f"model.layers.{i}": "cpu" for i in range(2, 6)}, "model.norm": "disk",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placed = llmbin.load(out, device_map=device_map, offload_folder=tmp_path / "offload")
    assert placed.model.layers[1].mlp.up_proj.weight.is_meta and not placed.model.layers[0].mlp.up_proj.weight.is_meta
    assert torch.equal(logits(placed), logits(model))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_save_pretrained_round_trips_in_memory_and_loaded_models(saved, tmp_path):
    model, out = saved
    model.save_pretrained(tmp_path / "from-memory")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "from-memory")
    assert torch.equal(logits(loaded), logits(model))
    loaded.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # transformers' sharding
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    # the same tensors, bit for bit and dtype for dtype, as llmbin's own writer stored
    original, resaved = _tensors(out), _tensors(tmp_path / "sharded")
    assert original.keys() == resaved.keys()
    assert all(original[k].dtype == resaved[k].dtype and torch.equal(original[k], resaved[k]) for k in original)
    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "sharded"), llmbin.load(tmp_path / "sharded")):
        assert torch.equal(logits(reloaded), logits(model))


def test_dequantize_gives_plain_linears_with_the_same_function(saved):
    model, out = saved
    dense = AutoModelForCausalLM.from_pretrained(out).dequantize()
    assert not any(isinstance(m, BinaryLinear) for m in dense.modules()) and not hasattr(dense.config, "quantization_config")
    torch.testing.assert_close(logits(dense), logits(model), rtol=1e-3, atol=1e-3)  # summation order


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    return packed_checkpoint(tiny_model("llama"), CALIB, tmp_path_factory.mktemp("ckpt") / "llama", tokenizer)[1]


def test_without_llmbin_transformers_refuses_the_checkpoint(llama_dir):
    out = llama_dir
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "Unknown quantization type, got llmbin" in run.stderr
    assert "q_proj.weight" in run.stderr and "size mismatch" in run.stderr.lower()  # every packed layer, by name
    assert "ignore_mismatched_sizes" in run.stderr


def test_a_future_format_version_in_config_json_is_refused(saved, tmp_path):
    import shutil

    _, out = saved
    dst = tmp_path / "future"
    shutil.copytree(out, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmbinError, match="format version 99, this llmbin reads versions 3, 4, 5"):
        AutoModelForCausalLM.from_pretrained(dst)
    with pytest.raises(LlmbinError, match="format version 99"):
        llmbin.load(dst)


def test_lm_eval_scores_a_task_from_the_checkpoint_path(saved, tokenizer):
    from lm_eval.models.huggingface import HFLM

    from llmbin.evaluate.zeroshot import checkpoint_lm, zero_shot

    _, out = saved
    by_path = zero_shot(HFLM(pretrained=str(out), device="cpu", dtype="float32", batch_size=4), None, ["piqa"], limit=3)
    by_model = zero_shot(llmbin.load(out), tokenizer, ["piqa"], limit=3, batch_size=4)
    assert by_path["tasks"] == by_model["tasks"] and 0 <= by_path["tasks"]["piqa"]["acc"] <= 1
    placed = checkpoint_lm(out, device_map={"": "cpu"}, batch_size=4)  # lm-eval's parallelize placement
    assert zero_shot(placed, None, ["piqa"], limit=3)["tasks"] == by_model["tasks"]


def test_python_m_llmbin_lm_eval_runs_lm_evals_own_command_line(llama_dir, tmp_path):
    out = llama_dir
    from llmbin.evaluate.zeroshot import TASK_DIR, resolve_task_data

    env = {**os.environ, "LLMBIN_TASK_DATA": str(resolve_task_data(None))}
    run = subprocess.run([sys.executable, "-m", "llmbin.lm_eval", "run", "--model", "hf", "--model_args",
                          f"pretrained={out},dtype=float32", "--tasks", "piqa", "--limit", "3", "--device", "cpu",
                          "--include_path", str(TASK_DIR), "--output_path", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "|piqa" in run.stdout and list((tmp_path / "results").rglob("results_*.json"))


def test_llmbin_eval_with_a_device_map_scores_through_lm_evals_placement(llama_dir, tmp_path):
    from llmbin.cli import main

    base = ["eval", str(llama_dir), "--tasks", "piqa", "--limit", "3", "--no-progress"]
    assert main(base + ["--json", str(tmp_path / "plain.json")]) == 0
    assert main(base + ["--device-map", '{"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", '
                        '"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}',
                        "--offload-folder", str(tmp_path / "offload"), "--json", str(tmp_path / "placed.json")]) == 0
    plain, placed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "placed"))
    assert placed["tasks"] == plain["tasks"] and placed["bits_per_weight"] == plain["bits_per_weight"]


def test_an_offload_folder_that_cannot_be_written_is_named_before_loading(llama_dir, tmp_path, capsys):
    """Issue 35's probe: an unwritable offload folder raised OSError from inside transformers, and
    through llmbin.load the message said "re-create the checkpoint", the wrong fix."""
    import llmbin
    from llmbin.cli import main

    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "offload"  # under a file: not creatable, for root too
    expected = f"--offload-folder {bad} cannot hold the offloaded weights (Not a directory); choose a folder you can write"
    with pytest.raises(LlmbinError) as info:
        llmbin.load(llama_dir, device_map={"": "cpu"}, offload_folder=bad)
    assert str(info.value) == expected
    assert main(["eval", str(llama_dir), "--device-map", "auto", "--offload-folder", str(bad), "--max-windows", "1",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"llmbin: error: {expected}"
