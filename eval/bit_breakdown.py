"""Where the bits of a packed checkpoint go: planes, scales, salient values and positions.

    python eval/bit_breakdown.py runs/pbllm10-hessian-n32-s0 [--json FILE]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from llmbin.checkpoint.io import read_checkpoint


def breakdown(checkpoint: Path) -> dict:
    tensors, layers = read_checkpoint(checkpoint)
    bits, encodings, weights = Counter(), Counter(), 0
    for name, meta in layers.items():
        weights += meta["shape"][0] * meta["shape"][1]
        encodings[meta.get("salient", {}).get("encoding", "none")] += 1
        for key, tensor in tensors.items():
            if key.startswith(name + "."):
                bits[key[len(name) + 1:]] += tensor.numel() * tensor.element_size() * 8
    per_weight = {part: b / weights for part, b in sorted(bits.items())}
    return {"weights": weights, "bits_per_weight": sum(bits.values()) / weights, "parts": per_weight,
            "position_encodings": dict(encodings)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json")
    args = p.parse_args()
    result = breakdown(args.checkpoint)
    print("| part | bits/weight |\n|---|---|")
    for part, value in result["parts"].items():
        print(f"| {part} | {value:.4f} |")
    print(f"| **total** | **{result['bits_per_weight']:.4f}** |")
    print(f"\nposition encodings chosen: {result['position_encodings']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
