"""True bits per weight of a llama.cpp GGUF file over the decoder blocks' linear layers.

The same count llmbin reports for its checkpoints: every stored byte of the quantized linears
(block scales, sub-scales, codebook indices) over their number of weights. A tensor's bytes follow
from its GGML type's block layout (``gguf.GGML_QUANT_SIZES``: weights per block, bytes per block),
checked against the bytes the file really holds.

    python eval/gguf_bits.py smollm2-IQ1_S.gguf [more.gguf ...] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def gguf_linear_bits(path: str | Path) -> dict:
    """``bits_per_weight`` over the block linears, with the weights' share per GGML type."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    bits = weights = 0
    share, tensors, other = Counter(), Counter(), {}
    for t in reader.tensors:
        n = 1
        for d in t.shape:
            n *= int(d)
        per_block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if n % per_block or n // per_block * block_bytes != int(t.n_bytes):
            raise ValueError(f"{path}: {t.name} holds {int(t.n_bytes)} bytes, not what {t.tensor_type.name} implies for {n} weights")
        if LINEAR.match(t.name):
            bits, weights = bits + int(t.n_bytes) * 8, weights + n
            share[t.tensor_type.name] += n
            tensors[t.tensor_type.name] += 1
        elif not t.name.startswith("blk."):
            other[t.name] = t.tensor_type.name
    if not weights:
        raise ValueError(f"{path}: no decoder-block linear tensors (blk.N.attn_*/ffn_*.weight)")
    return {"file": str(path), "bits_per_weight": bits / weights, "linear_weights": weights,
            "linear_tensors_by_type": dict(tensors), "weight_share_by_type": {k: v / weights for k, v in share.items()},
            "other_tensors": other, "file_bytes": Path(path).stat().st_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--json", help="write the counts here")
    args = p.parse_args()
    counts = [gguf_linear_bits(f) for f in args.files]
    print("| file | bits/weight (block linears) | linear tensors by type | file MiB |")
    print("|---|---|---|---|")
    for c in counts:
        types = ", ".join(f"{k} {v}" for k, v in sorted(c["linear_tensors_by_type"].items(), key=lambda kv: -kv[1]))
        print(f"| {Path(c['file']).name} | {c['bits_per_weight']:.4f} | {types} | {c['file_bytes'] / 2**20:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=2) + "\n")


if __name__ == "__main__":
    main()
