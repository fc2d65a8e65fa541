import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llmbin
from llmbin.bits import bit_report, directory_bytes
from llmbin.errors import LlmbinError
from llmbin.packing.packed_weight import FORMAT_VERSION
from tests.conftest import packed_checkpoint, tiny_model

CALIB = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
INPUT = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def saved(request, tmp_path_factory):
    return packed_checkpoint(tiny_model(request.param), CALIB, tmp_path_factory.mktemp("ckpt") / request.param)


def test_saved_then_loaded_logits_are_identical(saved):
    model, out = saved
    loaded = llmbin.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, model(INPUT).logits)


def test_config_records_method_parameters_and_versions(saved):
    _, out = saved
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "llmbin" and q["method"] == "pb-llm" and q["format_version"] == FORMAT_VERSION
    assert q["llmbin_version"] == llmbin.__version__
    assert q["salient_frac"] == 0.1 and q["salient_metric"] == "hessian" and q["percdamp"] == 0.01
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["llmbin_format"] == "llmbin-packed" and meta["format_version"] == str(FORMAT_VERSION)
    assert "model.layers.0.self_attn.q_proj" in json.loads(meta["layers"])


def test_packed_layers_are_stored_at_their_true_size(saved):
    model, out = saved
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        planes = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        assert planes.dtype == torch.uint8 and planes.shape == (1, 96, 8)  # 64 inputs -> 8 bytes per row
        others = [k for k in f.keys() if "layers" in k and f.get_slice(k).get_dtype() not in ("U8", "F16")]
        assert others == []  # no float copy of any quantized weight
    report = bit_report(model)
    assert report["quantized_bits"] / 8 < directory_bytes(out)
    assert 1.0 < report["bits_per_weight"] < 4.0


def test_existing_output_directory_is_refused(saved):
    model, out = saved
    with pytest.raises(LlmbinError, match="already exists"):
        llmbin.save(model, None, out)


def test_failed_save_leaves_no_directory(tmp_path):
    model = llmbin.quantize(tiny_model(), llmbin.PBLLMConfig(), CALIB, progress=False)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        llmbin.save(model, BrokenTokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _copy(out, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_truncated_checkpoint_gets_a_clear_error(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmbinError, match="truncated or corrupt"):
        llmbin.load(dst)


def _rewrite(path, edit_tensors=None, edit_meta=None):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def test_a_version_3_checkpoint_still_loads(saved, tmp_path):
    """Version 4 only added the optional rotation; version-3 files (no rotation) read as before."""
    model, out = saved
    dst = _copy(out, tmp_path)
    _rewrite(dst / "model.safetensors", None, lambda m: m.__setitem__("format_version", "3"))
    with torch.no_grad():
        assert torch.equal(llmbin.load(dst)(INPUT).logits, model(INPUT).logits)


DIGEST = "does not match its digest"


@pytest.mark.parametrize("edit_tensors,edit_meta,match,verified_match", [
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", t["model.layers.0.mlp.up_proj.weight"][:, :5]),
     None, "damaged", DIGEST),
    (lambda t: t.pop("model.layers.1.self_attn.o_proj.alpha"), None, "damaged", "damaged"),
    (lambda t: t.pop("model.norm.weight"), None, "does not match", "does not match"),
    (None, lambda m: m.__setitem__("format_version", "99"), "format version 99", "format version 99"),
    (None, lambda m: m.__setitem__("llmbin_format", "other"), "not an llmbin packed checkpoint", "not an llmbin packed"),
])
def test_tampered_checkpoint_gets_a_clear_error(saved, tmp_path, edit_tensors, edit_meta, match, verified_match):
    """With verification (the default) and without it, where the structural checks still hold."""
    dst = _copy(saved[1], tmp_path)
    _rewrite(dst / "model.safetensors", edit_tensors, edit_meta)
    with pytest.raises(LlmbinError, match=verified_match):
        llmbin.load(dst)
    with pytest.raises(LlmbinError, match=match):
        llmbin.load(dst, verify=False)


def test_a_folder_that_is_not_a_checkpoint_is_rejected(tmp_path):
    with pytest.raises(LlmbinError, match="not an llmbin checkpoint"):
        llmbin.load(tmp_path)


def test_a_checkpoint_path_that_is_a_loop_of_links_or_a_file_is_named_as_such(tmp_path):
    """Issue 35's probe: a loop of symbolic links was reported as "not an llmbin checkpoint"."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("x")
    for path, problem in ((tmp_path / "loop", "is a loop of symbolic links"), (tmp_path / "file", "is a file, not a folder"),
                          (tmp_path / "absent", "does not exist")):
        with pytest.raises(LlmbinError) as info:
            llmbin.load(path)
        assert str(info.value) == f"checkpoint {path} {problem}; give the folder llmbin quantize wrote"


@pytest.mark.parametrize("method,options", [("rtn-sign", {}), ("gptq", {"bits": 3, "group_size": 32}),
                                            ("db-llm", {}), ("db-llm", {"planes": 1, "group_size": 32}),
                                            ("billm", {"blocksize": 32}),
                                            ("billm", {"refine_iters": 15, "refit_scales": True}),
                                            ("arb-rc", {"blocksize": 32})])
def test_every_method_saves_and_loads_bit_identically(method, options, tmp_path):
    model = llmbin.quantize(tiny_model("llama"), llmbin.make_config(method, **options), CALIB, progress=False)
    llmbin.save(model, None, tmp_path / "ckpt")
    loaded = llmbin.load(tmp_path / "ckpt")
    assert loaded.config.quantization_config.method == method
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, model(INPUT).logits)
    assert bit_report(loaded)["bits_per_weight"] == pytest.approx(bit_report(model)["bits_per_weight"])


@pytest.fixture(scope="module")
def sharded(saved, tmp_path_factory):
    model, _ = saved
    out = tmp_path_factory.mktemp("sharded") / "ckpt"
    llmbin.save(model, None, out, max_shard_bytes=20_000)
    return model, out


def test_sharded_checkpoint_round_trips(sharded):
    model, out = sharded
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"  # transformers' names
    packed = set(llmbin.checkpoint.io.binary_modules(model))
    stored = set()
    for name in files:
        with safe_open(str(out / name), "pt") as f:
            meta = f.metadata()
            layers = json.loads(meta["layers"])
            assert meta["format"] == "pt" and meta["llmbin_format"] == "llmbin-packed"
            assert set(layers) == packed  # each shard describes every packed layer, as save_pretrained writes them
            stored |= {k.rsplit(".", 1)[0] for k in f.keys()} & packed
    assert stored == packed
    loaded = llmbin.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, model(INPUT).logits)
    assert bit_report(loaded)["bits_per_weight"] == bit_report(model)["bits_per_weight"]


def test_a_missing_shard_gets_a_clear_error(sharded, tmp_path):
    dst = _copy(sharded[1], tmp_path)
    next(dst.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(LlmbinError, match="lacks the shard"):
        llmbin.load(dst)


def test_an_index_that_does_not_match_its_shards_gets_a_clear_error(sharded, tmp_path):
    dst = _copy(sharded[1], tmp_path)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LlmbinError, match="incomplete"):
        llmbin.load(dst)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases, added after the output-side inverse
@pytest.mark.parametrize("method,options", [("db-llm", {"rotate": "both"}), ("pb-llm", {"rotate": "input"}),
                                            ("arb-rc", {"blocksize": 32, "rotate": "both", "rotate_seed": 5})])
def test_rotated_checkpoints_load_to_the_in_memory_models_perplexity_exactly(kind, method, options, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmbin.evaluate.perplexity import perplexity
    from llmbin.nn import BinaryLinear

    model = llmbin.quantize(tiny_model(kind), llmbin.make_config(method, **options), CALIB, progress=False)
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert layers and all(m.rotation is not None for m in layers)
    assert all((m.rotation.output_seed is not None) == (options["rotate"] == "both") for m in layers)
    llmbin.save(model, None, tmp_path / "ckpt")
    q = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert q["rotate"] == options["rotate"] and q["rotate_seed"] == options.get("rotate_seed", 0)
    text = torch.randint(0, 300, (400,), generator=torch.Generator().manual_seed(3))
    expected = perplexity(model, text, seqlen=64, progress=False)
    for loaded in (llmbin.load(tmp_path / "ckpt"), AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")):
        assert perplexity(loaded, text, seqlen=64, progress=False) == expected
        seeds = [m.rotation for m in loaded.modules() if isinstance(m, BinaryLinear)]
        assert seeds == [m.rotation for m in layers]
