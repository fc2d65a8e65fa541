"""Are two code versions' checkpoints bit-identical? Quantize a tiny random Llama with every shipped
recipe, and record the digest of every stored tensor, so that a refactor can be checked to change
nothing numerically (run it before and after on the same machine, then compare the two records).

    python eval/checkpoint_identity.py tiny --out-dir runs/identity-before      # every recipe, tiny model
    python eval/checkpoint_identity.py digests runs/m/pb-llm-10 --json a.json  # any checkpoint's digests
    python eval/checkpoint_identity.py compare a.json b.json                   # exit 1 on any difference

The digests are the checkpoint's own (XXH3-128 over each tensor's name, dtype, shape and bytes),
read back from the files on disk. Float rounding can differ between CPUs and thread counts, so
records are compared on one machine with one thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the model binary weight scale layer token window error sign salient column row packed bit "
         "hessian reconstruction calibration perplexity quantize checkpoint kernel matrix vector").split()


def checkpoint_digests(folder: Path) -> dict[str, str]:
    from llmbin.checkpoint.digests import file_digests

    digests = {}
    for file in sorted(folder.glob("*.safetensors")):
        digests.update(file_digests(file))
    recorded = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    for key in ("data", "model"):  # where the run read its inputs from, not what it computed
        recorded.get("calibration", {}).pop(key, None)
    digests["config.json:quantization_config"] = json.dumps(recorded, sort_keys=True)
    return dict(sorted(digests.items()))


def tiny_model(folder: Path) -> None:
    """A 2-block Llama (hidden 64) with random weights and a small BPE tokenizer trained here."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(1)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                     eos_token="</s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_tiny(out_dir: Path, recipes: list[str]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    model, corpus = out_dir / "tiny-llama", out_dir / "corpus.txt"
    if not model.exists():
        tiny_model(model)
    rng = random.Random(2)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)))
    record = {}
    for recipe in recipes:
        ckpt = out_dir / recipe
        if not ckpt.exists():
            subprocess.run([sys.executable, "-m", "llmbin.cli", "quantize", "--model", str(model), "--recipe",
                            str(REPO / "recipes" / f"{recipe}.yaml"), "--calib-data", str(corpus), "--nsamples", "8",
                            "--seqlen", "64", "--seed", "0", "--out", str(ckpt), "--no-progress"], check=True)
        record[recipe] = checkpoint_digests(ckpt)
    return record


def compare(a: dict, b: dict) -> list[str]:
    differences = []
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if isinstance(x, dict) and isinstance(y, dict):
            differences += [f"{name}: {d}" for d in compare(x, y)]
        elif x != y:
            differences.append(f"{name}: {'missing' if x is None else x} != {'missing' if y is None else y}")
    return differences


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tiny", help="quantize a tiny random Llama with each recipe and record the digests")
    t.add_argument("--out-dir", required=True, type=Path)
    t.add_argument("--recipe", action="append", help="only these recipes (default: every recipe in recipes/)")
    d = sub.add_parser("digests", help="record the digests of checkpoints")
    d.add_argument("checkpoints", nargs="+", type=Path)
    for q in (t, d):
        q.add_argument("--json", type=Path, help="write the record here")
    c = sub.add_parser("compare", help="compare two records; exit 1 on any difference")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()

    if args.command == "compare":
        a, b = (json.loads(path.read_text()) for path in (args.a, args.b))
        for record in (a, b):
            record.pop("_threads", None)
        if len(a) == len(b) == 1:  # one checkpoint each, under different folder names
            a, b = next(iter(a.values())), next(iter(b.values()))
        differences = compare(a, b)
        print("\n".join(differences) if differences else "identical")
        return 1 if differences else 0
    if args.command == "tiny":
        recipes = args.recipe or sorted(f.stem for f in (REPO / "recipes").glob("*.yaml"))
        record = run_tiny(args.out_dir, recipes)
    else:
        record = {c.name: checkpoint_digests(c) for c in args.checkpoints}
    record["_threads"] = os.environ.get("OMP_NUM_THREADS", "default")
    text = json.dumps(record, indent=1) + "\n"
    if args.json:
        args.json.write_text(text)
    print(f"{sum(len(v) for v in record.values() if isinstance(v, dict))} digests of {len(record) - 1} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
