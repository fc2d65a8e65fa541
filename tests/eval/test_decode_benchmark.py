"""The decode benchmark's random-layout model: streamed like quantization, so a 7B shape never exists in float32."""
from collections.abc import Mapping

import pytest
import torch
from decode_benchmark import kv_element_bytes, layout_model, model_bytes_per_token
from safetensors.torch import load_file

import llmbin.models
from llmbin.nn import BinaryLinear


class _Recording(Mapping):
    def __init__(self, weights):
        self.weights, self.read = weights, []

    def __getitem__(self, name):
        self.read.append(name)
        return self.weights[name]

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def test_a_layout_model_reads_all_but_the_block_linears(tiny_sharded_dir, monkeypatch):
    opened = []
    open_model = llmbin.models.open_model

    def recording(*args, **kwargs):
        result = open_model(*args, **kwargs)
        assert result.streamed  # a sharded folder opens as a skeleton
        result.weights = _Recording(result.weights)
        opened.append(result)
        return result

    monkeypatch.setattr(llmbin.models, "open_model", recording)
    model, tokenizer = layout_model(str(tiny_sharded_dir), "pb-llm-10")
    read = opened[0].weights.read
    assert read and not [n for n in read if n.endswith("_proj.weight")]  # random codes replace those
    assert not [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    packed = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert len(packed) == 14 and all(m.packed().salient is not None for m in packed)
    stored = {}
    for shard in tiny_sharded_dir.glob("model-*.safetensors"):
        stored.update(load_file(shard))
    # the tensors outside the linears are the model's own, served in 16 bits as a loaded checkpoint's are
    norm = model.model.layers[1].post_attention_layernorm.weight
    assert torch.equal(norm.float(), stored["model.layers.1.post_attention_layernorm.weight"].float())
    embedding = model.get_input_embeddings().weight
    assert torch.equal(embedding, stored["model.embed_tokens.weight"].to(embedding.dtype))
    ids = tokenizer("the cat sat", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_an_unknown_layout_is_refused(tiny_sharded_dir):
    with pytest.raises(SystemExit, match="unknown layout 'pb-llm-3'"):
        layout_model(str(tiny_sharded_dir), "pb-llm-3")


def test_the_kv_bytes_are_the_caches_own(tiny_sharded_dir):
    model, _ = layout_model(str(tiny_sharded_dir), "db-llm-fdb")
    # the 16-bit embedding makes model.dtype half, but the activations and the cache are float32
    assert model.dtype in (torch.float16, torch.bfloat16) and kv_element_bytes(model) == 4
    c = model.config
    width = c.num_key_value_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    assert model_bytes_per_token(model)[1] == c.num_hidden_layers * 2 * width * 4  # per cached position
