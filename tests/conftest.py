"""Tiny random models with a real (locally trained) tokenizer: no hub, no downloads."""
import contextlib
import os
import random
from pathlib import Path

import pytest
import torch

# The offline data copies (wikitext-2, the zero-shot tasks) beside the checkout, unless LLMBIN_DATA says
# otherwise; the Makefile sets it the same way.
os.environ.setdefault("LLMBIN_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

WORDS = ("the model binary weight scale layer token window error sign salient column row packed bit "
         "hessian reconstruction calibration perplexity quantize checkpoint kernel matrix vector").split()


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12)]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(2000, seed=1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(kind: str = "llama", vocab_size: int = 300):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=False)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)  # q/k/v carry biases
    if kind == "opt":
        return transformers.OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind)).eval()


def saved_tiny_model(path, tokenizer, **config):
    """The tiny Llama, with ``config`` changed (e.g. ``num_hidden_layers=6``), saved with ``tokenizer`` to
    ``path``: a source model folder for ``llmbin quantize``."""
    from transformers import AutoModelForCausalLM

    changed = tiny_config()
    for key, value in config.items():
        setattr(changed, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(changed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def packed_checkpoint(model, calibration, out, tokenizer=None):
    """``model`` quantized with PB-LLM's defaults and saved to ``out`` (with ``tokenizer`` if given): (model, out)."""
    import llmbin

    model = llmbin.quantize(model, llmbin.make_config("pb-llm"), calibration, progress=False)
    llmbin.save(model, tokenizer, out)
    return model, out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sharded_dir(tmp_path_factory, tokenizer):
    """The tiny Llama as a 16-bit checkpoint in transformers-style shards (with an index), as big models come."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama-sharded"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("model-*.safetensors"))) > 2
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(make_text(3000, seed=2))
    return path


@pytest.fixture(scope="session")
def ext():
    """The compiled CPU kernel; its tests fail (not skip) when it does not build."""
    from llmbin.kernels.cpu import extension

    module = extension()
    if module is None:
        pytest.fail("the C++ CPU kernel did not build; CI needs a C++ compiler and ninja")
    return module


@contextlib.contextmanager
def interrupt_after_first_block(monkeypatch):
    """Inside the block, a quantization stops with KeyboardInterrupt right after saving its first
    finished block (as a kill at that point would); the real ``BlockStore.save`` is back afterwards."""
    from llmbin.checkpoint.resume import BlockStore

    original = BlockStore.save

    def save_then_interrupt(self, index, modules):
        original(self, index, modules)
        raise KeyboardInterrupt

    monkeypatch.setattr(BlockStore, "save", save_then_interrupt)
    try:
        yield
    finally:
        monkeypatch.setattr(BlockStore, "save", original)


def write_gguf(path, model, tokenizer, tensor_type: str = "F32", skip=()):
    """``model`` (a tiny Llama or Qwen2) written as llama.cpp writes a GGUF file, with ``gguf``'s
    ``GGUFWriter``: its config and tokenizer as metadata, Llama's q/k rows permuted as llama.cpp
    permutes them, 2-D tensors in ``tensor_type`` (F32, F16 or a quantized type such as Q8_0), norms
    and biases in F32, a tied head not stored; the GGUF tensors named in ``skip`` left out."""
    import json

    import gguf

    cfg, kind = model.config, model.config.model_type
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[kind]
    qtype = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(str(path), kind)
    writer.add_name(f"tiny-{kind}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.get_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    writer.add_token_types([1] * len(vocab))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_unk_token_id(vocab["<unk>"])
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    seen = set()
    for hf_name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied head is not stored
            continue
        seen.add(id(tensor))
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in skip:
            continue
        array = tensor.detach().float().numpy().copy()
        if kind == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's permutation
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            array = array.reshape(heads, 2, array.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(array.shape)
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            array = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_untied_qwen2(seed: int = 0):
    """The tiny Qwen2 (q/k/v biases) with its own output matrix, as Qwen2.5-1.5B has."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2")
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_gguf_files(tmp_path_factory, tokenizer):
    """``{"llama": F16 Llama with permuted q/k, "qwen2": Q8_0 Qwen2 with biases and an untied head}``."""
    folder = tmp_path_factory.mktemp("gguf")
    return {"llama": write_gguf(folder / "llama-f16.gguf", tiny_model("llama"), tokenizer, "F16"),
            "qwen2": write_gguf(folder / "qwen2-q8_0.gguf", tiny_untied_qwen2(), tokenizer, "Q8_0")}
