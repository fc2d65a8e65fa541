"""Write a random-weight Hugging Face checkpoint with a real model's shapes, for scale benchmarks.

The folder looks like a downloaded model: ``config.json``, bf16 safetensors shards with
``model.safetensors.index.json``, and a word-level tokenizer whose vocabulary matches the
config (``w3``, ``w4``, ...), so ``llmbin quantize`` and ``llmbin eval`` run on it unchanged with
text of random words (:func:`write_random_text`). Tensors are generated and written one shard at
a time, so writing a 70B-shaped folder needs one shard of memory, not the model.

``--gguf FILE`` also writes the folder's weights as an F16 GGUF for llama.cpp (``llama-quantize``
and ``llama-bench`` on the same shapes and values: ``eval/decode_benchmark.py``), one tensor at a
time, as llama.cpp's converter lays out a Llama: its tensor names, query and key rows permuted to
its rotary layout, norms in F32, and a SentencePiece vocabulary of the folder's size.

    python eval/random_checkpoint.py llama-2-7b runs/scale/llama-2-7b-random
    python eval/random_checkpoint.py llama-2-70b runs/scale/llama-2-70b-random --layers 2
    python eval/random_checkpoint.py llama-2-7b runs/scale/llama-2-7b-random --gguf runs/scale/llama-2-7b.F16.gguf
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

SHAPES = {  # the published configs' shapes
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        num_hidden_layers=80),
}
SHARD_BYTES = 2 * 10**9


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    dims = dict(SHAPES[shape])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    return LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       dtype="bfloat16", **dims)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def write_random_text(path: Path, words: int, vocab_size: int, seed: int) -> None:
    """Random words of the tokenizer above, one token each: calibration and evaluation text."""
    rng = random.Random(seed)
    lines = (" ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(16)) for _ in range(-(-words // 16)))
    path.write_text("\n".join(lines) + "\n")


@torch.no_grad()
def write_checkpoint(folder: Path, config, seed: int = 0) -> int:
    """Random bf16 weights (normal, std 0.02; norms 1) in transformers-style shards; returns the bytes written."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: t.shape for name, t in skeleton.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if "norm" in name:
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        print(f"  {file}: {len(names)} tensors", flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    write_tokenizer(folder, config.vocab_size)
    return total


def _rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Query or key rows in llama.cpp's rotary order (its converter's ``permute``): the pairs
    (i, i + d/2) that Hugging Face rotates together become adjacent rows."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def write_gguf(folder: Path, out: Path) -> int:
    """The folder's weights as a llama-architecture F16 GGUF; returns the bytes of tensor data."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    head_dim = config.hidden_size // config.num_attention_heads
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    # A SentencePiece vocabulary of the folder's size: its byte tokens (which llama.cpp needs to tokenize any
    # text, as llama-imatrix does), then the folder's words. llama-bench feeds token ids, not text.
    words = config.vocab_size - 3 - 256
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)),
                           *(f"\u2581w{i}" for i in range(3 + 256, config.vocab_size))])
    writer.add_token_scores([0.0] * config.vocab_size)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    writer.add_token_types(types + [gguf.TokenType.NORMAL] * words)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def tensor(name: str) -> np.ndarray:
        # a shard opened per tensor: a mapping held open would keep every page read resident (140 GB at 70B)
        with safe_open(folder / index[name], "pt") as f:
            value = f.get_tensor(name)
        if name.endswith("q_proj.weight"):
            value = _rotary_rows(value, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = _rotary_rows(value, config.num_key_value_heads)
        return value.to(torch.float32 if value.dim() == 1 else torch.float16).numpy()

    plan = []
    for name in index:
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise SystemExit(f"{name} has no llama.cpp name")
        with safe_open(folder / index[name], "pt") as f:
            shape = f.get_slice(name).get_shape()
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(target, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        plan.append(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for i, name in enumerate(plan):
        value = tensor(name)
        writer.write_tensor_data(value)
        total += value.nbytes
        if i % 50 == 0:
            print(f"  {out.name}: {i + 1}/{len(plan)} tensors", flush=True)
    writer.close()
    partial.replace(out)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, help="decoder blocks (default: the real model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf", type=Path, help="also write the weights as an F16 GGUF for llama.cpp")
    args = parser.parse_args()
    if (args.folder / "model.safetensors.index.json").is_file() and args.gguf:
        print(f"{args.folder} exists: kept")  # the index is written last, so the folder is whole
    else:
        total = write_checkpoint(args.folder, llama_config(args.shape, args.layers), args.seed)
        print(f"wrote {args.folder}: {total / 2**30:.2f} GiB of bf16 weights")
    if args.gguf and args.gguf.is_file():
        print(f"{args.gguf} exists: kept")  # written under a temporary name, then renamed: whole
    elif args.gguf:
        total = write_gguf(args.folder, args.gguf)
        print(f"wrote {args.gguf}: {total / 2**30:.2f} GiB of tensors")


if __name__ == "__main__":
    main()
