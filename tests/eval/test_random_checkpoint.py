"""The random checkpoint's GGUF is the same model as its folder, for llama.cpp (decode speed on one shape)."""
import torch
from random_checkpoint import write_checkpoint, write_gguf
from transformers import AutoModelForCausalLM, LlamaConfig


def test_the_gguf_computes_what_the_folder_computes(tmp_path):
    # 4 query heads sharing 2 key-value heads: the rotary permutation of q and k rows must use each one's count
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, dtype="bfloat16")
    folder = tmp_path / "random"
    write_checkpoint(folder, config)
    write_gguf(folder, tmp_path / "random.F16.gguf")
    assert not list(tmp_path.glob("*.partial"))
    stored = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # transformers reads a llama GGUF back by undoing llama.cpp's converter (names, q/k row order)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="random.F16.gguf", dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = stored(ids).logits, converted(ids).logits
    # bf16 values in F16: exact but for the few below F16's normal range
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
