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
