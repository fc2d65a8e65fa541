"""--embedding-bits: the token embedding and the output matrix stored as 8- or 4-bit tables; a tied
pair stays one table; the saved-then-loaded model computes what the in-memory one does."""
import json

import pytest
import torch
from safetensors import safe_open

import llmbin
from llmbin.config import make_config
from llmbin.errors import LlmbinError
from llmbin.nn.table_weights import TableEmbedding, TableLinear
from tests.conftest import tiny_model

CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
INPUT = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))


def _stored(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("kind, bits", [("llama", 8), ("mistral", 4), ("qwen2", 8)])  # tied, untied, tied with biases
def test_tables_save_load_and_compute_as_in_memory(kind, bits, tmp_path):
    model = llmbin.quantize(tiny_model(kind), llmbin.PBLLMConfig(embedding_bits=bits, embedding_group_size=16), CALIB,
                            progress=False)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, TableEmbedding) and isinstance(head, TableLinear)
    tied = model.config.tie_word_embeddings
    assert (head.weight is embedding.weight and head.weight_scale is embedding.weight_scale) == tied
    llmbin.save(model, None, tmp_path / "ckpt")
    stored, metadata = _stored(tmp_path / "ckpt")
    codes = torch.int8 if bits == 8 else torch.uint8
    assert stored["model.embed_tokens.weight"].dtype == codes
    assert ("lm_head.weight" in stored) == ("lm_head.weight_scale" in stored) == (not tied)  # a tied table is stored once
    assert metadata["format_version"] == "6" and json.loads(metadata["layers"])["model.embed_tokens"]["bits"] == bits
    loaded = llmbin.load(tmp_path / "ckpt")
    assert isinstance(loaded.get_input_embeddings(), TableEmbedding)
    assert isinstance(loaded.get_output_embeddings(), TableLinear)
    if tied:
        assert loaded.get_output_embeddings().weight_scale is loaded.get_input_embeddings().weight_scale
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, model(INPUT).logits)
    assert loaded.config.quantization_config.embedding_bits == bits


def test_tables_shrink_the_file_and_stay_close_to_the_fp16_model(tmp_path):
    fp16 = llmbin.quantize(tiny_model(), llmbin.PBLLMConfig(), CALIB, progress=False)
    eight = llmbin.quantize(tiny_model(), llmbin.PBLLMConfig(embedding_bits=8, embedding_group_size=16), CALIB,
                            progress=False)
    with torch.no_grad():
        a, b = fp16(INPUT).logits, eight(INPUT).logits
    assert (a - b).abs().max() < 0.02 * a.abs().max()  # 8 bits: the tables change the logits little
    llmbin.save(fp16, None, tmp_path / "fp16")
    llmbin.save(eight, None, tmp_path / "eight")
    table_bytes = 300 * 64 * (2 - 1) - 300 * 4 * 2  # codes 1 byte instead of 2, plus a scale per 16 columns
    assert ((tmp_path / "fp16" / "model.safetensors").stat().st_size
            - (tmp_path / "eight" / "model.safetensors").stat().st_size) > table_bytes - 4096  # header slack
    report = llmbin.bits.bit_report(eight)
    assert report["tables"] == {"model.embed_tokens": {"bits": 8, "group_size": 16, "bits_per_weight": 8 + 16 / 16}}


def test_a_checkpoint_without_tables_stays_version_5(tmp_path):
    llmbin.save(llmbin.quantize(tiny_model(), llmbin.PBLLMConfig(), CALIB, progress=False), None, tmp_path / "c")
    assert _stored(tmp_path / "c")[1]["format_version"] == "5"


@pytest.mark.parametrize("options, message", [
    ({"embedding_bits": 3}, "--embedding-bits must be 16, 8 or 4, got 3"),
    ({"embedding_group_size": 15}, "--embedding-group-size must be an even number of columns, got 15"),
    ({"layers": [{"match": "down_proj", "embedding_bits": 8}]}, "sets embedding_bits, which apply to the whole run"),
])
def test_bad_table_options_are_refused(options, message):
    with pytest.raises(LlmbinError, match=message):
        make_config("pb-llm", **options)


def test_a_streamed_model_writes_the_tables_its_whole_load_writes(tiny_sharded_dir, tmp_path):
    from llmbin.models import open_model
    from llmbin.quantize import quantize_and_save
    from tests.test_quantize import _assert_same_checkpoint

    config = llmbin.PBLLMConfig(embedding_bits=4, embedding_group_size=16)
    quantize_and_save(open_model(str(tiny_sharded_dir)), config, CALIB, tmp_path / "streamed", progress=False)
    quantize_and_save(open_model(str(tiny_sharded_dir), whole=True), config, CALIB, tmp_path / "whole", progress=False)
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole")
    assert _stored(tmp_path / "streamed")[0]["model.embed_tokens.weight"].dtype == torch.uint8


def test_a_tied_output_matrix_that_cannot_serve_a_table_is_refused():
    from llmbin.nn.table_weights import quantize_tables

    class Head(torch.nn.Module):  # tied, but not a plain linear layer
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

    model = tiny_model()
    model.lm_head = Head(model.get_input_embeddings().weight)
    with pytest.raises(LlmbinError, match=r"the output matrix \(Head\) is tied to the embedding but is not a plain "
                                          "linear layer"):
        quantize_tables(model, 8, 16)
