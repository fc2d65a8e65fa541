"""What quantized tables (``--embedding-bits``) cost in perplexity, apart from the blocks: the float
model with only its embedding and output matrix stored as 8- or 4-bit tables.

    LLMBIN_DATA=../shared/data python eval/embedding_tables.py --model smollm2-135m --windows 20
"""
from __future__ import annotations

import argparse
import json

from llmbin.data.text import resolve_text
from llmbin.evaluate.perplexity import perplexity
from llmbin.models import load_model
from llmbin.nn.table_weights import quantize_tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=20, help="first wikitext-2 test windows of 2048 tokens")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    results = {}
    for bits in (16, 8, 4):
        model, tokenizer = load_model(args.model)
        if bits != 16:
            quantize_tables(model, bits, args.group_size)
        ids = tokenizer(resolve_text("wikitext2", "test"), return_tensors="pt").input_ids[0]
        results[bits] = perplexity(model, ids, seqlen=2048, max_windows=args.windows, progress=False)
        print(f"embedding and output matrix at {bits} bits: perplexity {results[bits]:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "windows": args.windows, "group_size": args.group_size, "ppl": results}, f)


if __name__ == "__main__":
    main()
