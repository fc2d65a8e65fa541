"""Write a random-weight Hugging Face checkpoint with a real model's shapes, for scale benchmarks.

The folder looks like a downloaded model: ``config.json``, bf16 safetensors shards with
``model.safetensors.index.json``, and a word-level tokenizer whose vocabulary matches the
config (``w3``, ``w4``, ...), so ``llmbin quantize`` and ``llmbin eval`` run on it unchanged with
text of random words (:func:`write_random_text`). Tensors are generated and written one shard at
a time, so writing a 70B-shaped folder needs one shard of memory, not the model.

    python eval/random_checkpoint.py llama-2-7b runs/scale/llama-2-7b-random
    python eval/random_checkpoint.py llama-2-70b runs/scale/llama-2-70b-random --layers 2
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, help="decoder blocks (default: the real model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    total = write_checkpoint(args.folder, llama_config(args.shape, args.layers), args.seed)
    print(f"wrote {args.folder}: {total / 2**30:.2f} GiB of bf16 weights")


if __name__ == "__main__":
    main()
