"""Fault injection: a flipped byte anywhere in a checkpoint's tensors, its header's dtypes and shapes,
or its layer description is refused at load, by name; so is a corrupt finished block under resume."""
import json
import shutil
import struct

import pytest
import torch

import llmbin
from llmbin.checkpoint.digests import file_digests, file_header_json, tensor_digest
from llmbin.errors import LlmbinError
from tests.conftest import interrupt_after_first_block, packed_checkpoint, tiny_model

CALIB = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
INPUT = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))

# one tensor of each kind PB-LLM stores, plus float ones outside the packed layers
TENSORS = {
    "sign planes": "model.layers.0.mlp.up_proj.weight",
    "row scale": "model.layers.1.self_attn.q_proj.alpha",
    "salient magnitudes": "model.layers.0.self_attn.v_proj.salient_magnitudes",
    "salient positions": "model.layers.1.mlp.down_proj.salient_positions",
    "embedding": "model.embed_tokens.weight",
    "norm": "model.layers.1.input_layernorm.weight",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    return packed_checkpoint(tiny_model(), CALIB, tmp_path_factory.mktemp("ckpt") / "pb", tokenizer)


def _copy(out, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def flip_byte(path, tensor: str, at: float = 0.5) -> None:
    """Flip one bit of ``tensor``'s data in a safetensors file, ``at`` of the way through it."""
    header, data_start = file_header_json(path)
    begin, end = header[tensor]["data_offsets"]
    offset = data_start + begin + int((end - begin - 1) * at)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def edit_header(path, old: bytes, new: bytes) -> None:
    """Replace the first ``old`` in a safetensors header by ``new`` of the same length."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert len(old) == len(new) and old in raw[8:8 + n]
    path.write_bytes(raw[:8] + raw[8:8 + n].replace(old, new, 1) + raw[8 + n:])


def test_every_tensor_kind_is_covered(saved):
    _, out = saved
    header, _ = file_header_json(out / "model.safetensors")
    assert set(TENSORS.values()) <= set(header)
    digests = json.loads(header["__metadata__"]["digests"])
    assert set(header) - {"__metadata__"} <= set(digests) and "__layers__" in digests


def test_the_recorded_digests_are_those_of_the_stored_bytes(saved):
    model, out = saved
    recorded = json.loads(file_header_json(out / "model.safetensors")[0]["__metadata__"]["digests"])
    actual = file_digests(out / "model.safetensors")
    assert all(recorded[name] == digest for name, digest in actual.items())
    name = TENSORS["row scale"]  # and the in-memory tensor, as stored, hashes to the same
    assert tensor_digest(name, model.state_dict()[name].half()) == actual[name]


@pytest.mark.parametrize("kind", TENSORS)
@pytest.mark.parametrize("at", [0.0, 0.5, 1.0])
def test_a_flipped_byte_in_any_tensor_is_refused_by_name(saved, tmp_path, kind, at):
    dst = _copy(saved[1], tmp_path)
    flip_byte(dst / "model.safetensors", TENSORS[kind], at)
    with pytest.raises(LlmbinError, match=rf"^{dst}/model.safetensors: tensor {TENSORS[kind]} does not match its "
                                          r"digest; the file is corrupt or was modified; re-download or re-create"):
        llmbin.load(dst)


def test_without_verification_a_flipped_byte_loads_silently(saved, tmp_path):
    """What verification prevents (and what ``verify=False`` / LLMBIN_VERIFY=0 opt into)."""
    model, out = saved
    dst = _copy(out, tmp_path)
    flip_byte(dst / "model.safetensors", TENSORS["row scale"])
    loaded = llmbin.load(dst, verify=False)
    with torch.no_grad():
        assert not torch.equal(loaded(INPUT).logits, model(INPUT).logits)


def test_the_cli_refuses_a_flipped_byte_in_one_line_unless_told_not_to_verify(saved, tmp_path, text_file, capsys):
    from llmbin.cli import main

    dst = _copy(saved[1], tmp_path)
    flip_byte(dst / "model.safetensors", TENSORS["sign planes"])
    argv = ["eval", str(dst), "--eval-data", str(text_file), "--seqlen", "16", "--max-windows", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"llmbin: error: {dst}/model.safetensors: tensor {TENSORS['sign planes']} does not match its digest; "
                   "the file is corrupt or was modified; re-download or re-create the checkpoint")
    assert main(argv + ["--no-verify"]) == 0


def test_the_environment_switch_turns_verification_off(saved, tmp_path, monkeypatch):
    dst = _copy(saved[1], tmp_path)
    flip_byte(dst / "model.safetensors", TENSORS["norm"])
    monkeypatch.setenv("LLMBIN_VERIFY", "0")
    llmbin.load(dst)
    monkeypatch.setenv("LLMBIN_VERIFY", "1")
    with pytest.raises(LlmbinError, match="does not match its digest"):
        llmbin.load(dst)


def test_a_tampered_dtype_or_shape_in_the_header_is_refused(saved, tmp_path):
    name = TENSORS["embedding"]
    dst = _copy(saved[1], tmp_path)
    edit_header(dst / "model.safetensors", f'"{name}":{{"dtype":"F16"'.encode(), f'"{name}":{{"dtype":"I16"'.encode())
    with pytest.raises(LlmbinError, match=f"tensor {name} does not match its digest"):
        llmbin.load(dst)
    dst = _copy(saved[1], tmp_path / "second")  # 300 x 64 -> 600 x 32: the same bytes, another shape
    edit_header(dst / "model.safetensors", f'"{name}":{{"dtype":"F16","shape":[300,64]'.encode(),
                f'"{name}":{{"dtype":"F16","shape":[600,32]'.encode())
    with pytest.raises(LlmbinError, match=f"tensor {name} does not match its digest"):
        llmbin.load(dst)


def test_a_tampered_layer_description_is_refused(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    edit_header(dst / "model.safetensors", b'\\"bits\\": 8', b'\\"bits\\": 7')  # inside the JSON string
    with pytest.raises(LlmbinError, match="packed-layer description does not match its digest"):
        llmbin.load(dst)


def test_a_flipped_byte_in_one_shard_is_refused(tmp_path):
    model = llmbin.quantize(tiny_model(), llmbin.PBLLMConfig(), CALIB, progress=False)
    out = llmbin.save(model, None, tmp_path / "sharded", max_shard_bytes=10_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    last = shards[-1]
    name = sorted(k for k in file_header_json(last)[0] if k != "__metadata__")[0]
    flip_byte(last, name)
    with pytest.raises(LlmbinError, match=f"{last.name}: tensor {name} does not match its digest"):
        llmbin.load(out)


def test_a_corrupt_finished_block_is_not_resumed(tmp_path):
    from llmbin.checkpoint.resume import BlockStore, block_path
    from llmbin.driver import quantize_blocks

    config = llmbin.PBLLMConfig()
    store = BlockStore(tmp_path / "work", {"test": 1})
    quantize_blocks(tiny_model(), config, CALIB, on_block_done=store.save, progress=False)
    path = block_path(tmp_path / "work", 0)
    flip_byte(path, "self_attn.k_proj.alpha")
    with pytest.raises(LlmbinError, match=rf"^finished block {path}: tensor self_attn.k_proj.alpha does not match its "
                                          rf"digest \(damaged\); delete {path} and rerun the same command"):
        quantize_blocks(tiny_model(), config, CALIB, done=store.finished(), progress=False)
    path.unlink()  # the advice, followed: the block is quantized again, to what it was
    fresh = BlockStore(tmp_path / "again", {"test": 1})
    quantize_blocks(tiny_model(), config, CALIB, on_block_done=fresh.save, progress=False)
    resumed = tiny_model()
    quantize_blocks(resumed, config, CALIB, done=store.finished(), on_block_done=store.save, progress=False)
    assert file_digests(path) == file_digests(block_path(tmp_path / "again", 0))


def _interrupted_run(model_dir, out, monkeypatch):
    """Quantize ``model_dir`` into ``out`` and stop after the first finished block, as a kill would."""
    from llmbin.models import open_model

    with interrupt_after_first_block(monkeypatch), pytest.raises(KeyboardInterrupt):
        llmbin.quantize_and_save(open_model(str(model_dir)), llmbin.PBLLMConfig(), CALIB, out, progress=False)


def test_a_swapped_model_is_not_resumed(tmp_path, tokenizer, monkeypatch):
    """Same config and file names, other weights: resuming would mix two models' blocks."""
    from llmbin.models import open_model

    model_dir = tmp_path / "model"
    tiny_model(seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "ckpt"
    _interrupted_run(model_dir, out, monkeypatch)
    shutil.rmtree(model_dir)
    tiny_model(seed=1).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(LlmbinError, match=rf"^{out}.partial holds blocks of another run \(model_weights: \"[0-9a-f]{{32}}\" then, "
                                          r"\"[0-9a-f]{32}\" now\); rerun with the same model and options to resume"):
        llmbin.quantize_and_save(open_model(str(model_dir)), llmbin.PBLLMConfig(), CALIB, out, progress=False)
    assert not out.exists()


def test_a_changed_option_is_named_when_a_resume_is_refused(tmp_path, tokenizer, monkeypatch):
    from llmbin.models import open_model

    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "ckpt"
    _interrupted_run(model_dir, out, monkeypatch)
    with pytest.raises(LlmbinError, match=r"another run \(config.salient_frac: 0.1 then, 0.2 now\)"):
        llmbin.quantize_and_save(open_model(str(model_dir)), llmbin.PBLLMConfig(salient_frac=0.2), CALIB, out,
                                 progress=False)
    # the same run resumes, and gives what an uninterrupted run gives
    llmbin.quantize_and_save(open_model(str(model_dir)), llmbin.PBLLMConfig(), CALIB, out, progress=False)
    llmbin.quantize_and_save(open_model(str(model_dir)), llmbin.PBLLMConfig(), CALIB, tmp_path / "whole", progress=False)
    assert file_digests(out / "model.safetensors") == file_digests(tmp_path / "whole" / "model.safetensors")


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.layers.1.post_attention_layernorm.weight",
                                    "model.norm.weight"])
def test_a_non_finite_value_anywhere_is_refused_by_name(tensor):
    model = tiny_model()
    with torch.no_grad():
        model.state_dict()[tensor].view(-1)[7] = float("inf") if "norm" in tensor else float("nan")
    with pytest.raises(LlmbinError, match=rf"^{tensor} has NaN or infinite values; the model file is corrupt, re-download it$"):
        llmbin.quantize(model, llmbin.PBLLMConfig(), CALIB, progress=False)


def test_a_non_finite_value_in_a_streamed_model_is_refused_by_name(tmp_path, tokenizer):
    from llmbin.models import open_model

    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    opened = open_model(str(tmp_path / "model"))
    assert opened.streamed
    with pytest.raises(LlmbinError, match=r"^model.norm.weight has NaN or infinite values"):
        llmbin.quantize_and_save(opened, llmbin.PBLLMConfig(), CALIB, tmp_path / "ckpt", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_config_json_that_is_not_json_is_a_one_line_error(saved, tmp_path, tiny_model_dir, text_file, capsys):
    from llmbin.cli import main

    dst = _copy(saved[1], tmp_path)
    (dst / "config.json").write_text("{ not json")
    assert main(["eval", str(dst), "--max-windows", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json cannot be read" in err
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text("{ not json")
    assert main(["quantize", "--model", str(model), "--method", "pb-llm", "--calib-data", str(text_file), "--nsamples",
                 "2", "--seqlen", "32", "--out", str(tmp_path / "q"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"could not load model '{model}'" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


def test_invalid_json_in_the_layer_description_is_a_one_line_error_with_or_without_verification(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    edit_header(dst / "model.safetensors", b'\\"planes\\": 1', b'\\"planes\\"; 1')
    with pytest.raises(LlmbinError, match="packed-layer description does not match its digest"):
        llmbin.load(dst)
    with pytest.raises(LlmbinError, match="damaged layer description; re-create the checkpoint"):
        llmbin.load(dst, verify=False)


def test_a_tokenizer_that_is_not_the_checkpoints_own_is_refused(saved, tmp_path, text_file, capsys):
    """Issue 35's probe: a checkpoint whose tokenizer.json ids were permuted (same vocabulary size)
    loaded and evaluated as normal; the tensors' digests do not cover the tokenizer files."""
    from llmbin.checkpoint.io import load_tokenizer
    from llmbin.cli import main

    dst = _copy(saved[1], tmp_path)
    recorded = json.loads((dst / "config.json").read_text())["quantization_config"]["tokenizer_digests"]
    assert "tokenizer.json" in recorded and "config.json" not in recorded
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    message = (f"{dst}: tokenizer file tokenizer.json does not match its recorded digest; the tokenizer does not belong "
               "to these weights; copy the tokenizer files that llmbin quantize wrote, or re-create the checkpoint "
               "(--no-verify / LLMBIN_VERIFY=0 to load it anyway)")
    with pytest.raises(LlmbinError) as info:
        load_tokenizer(dst)
    assert str(info.value) == message
    argv = ["eval", str(dst), "--eval-data", str(text_file), "--seqlen", "16", "--max-windows", "1", "--no-progress"]
    assert main(argv) == 2 and capsys.readouterr().err.strip() == f"llmbin: error: {message}"
    assert main(argv + ["--no-verify"]) == 0
    (dst / "tokenizer.json").unlink()  # tokenizer_config.json stays
    with pytest.raises(LlmbinError, match="tokenizer file .* recorded when the checkpoint was written, is missing"):
        load_tokenizer(dst)


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/hostname", "sub/tokenizer.json", ".."])
def test_a_tokenizer_digest_naming_a_file_outside_the_folder_is_refused_unread(saved, tmp_path, name):
    """The second probe: a digest recorded for ``../secret.txt`` made loading read and hash a file outside
    the checkpoint; digests are written for bare file names only, so any other name is refused unread."""
    from llmbin.checkpoint.io import load_tokenizer

    dst = _copy(saved[1], tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"]["tokenizer_digests"][name] = "0" * 32
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmbinError) as info:
        load_tokenizer(dst)
    assert str(info.value) == (f"{dst}: config.json records a digest for {name!r}, which is not a file of the checkpoint "
                               "folder; the config.json was edited or damaged, re-create the checkpoint")
