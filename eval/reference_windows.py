"""Quantize on the very calibration windows the papers' reference code draws, to compare algorithms
with the calibration sample held fixed.

The references' ``get_wikitext2`` joins the rows of the split into one token stream and draws each
window with Python's ``random.seed(seed); random.randint(0, N - seqlen - 1)``; llmbin's own loader
joins wikitext rows with blank lines and draws offsets with torch's generator, so the two sample
different text. Given the token stream the reference run used (a ``.npy`` of token ids, as
``../shared/reference-protocol.md`` prepares it), this script builds the reference's windows and
runs ``llmbin.quantize_and_save`` on them.

    python eval/reference_windows.py --stream /work/ref/data/calib_stream_wikitext2v1_val.npy \\
        --recipe recipes/pb-llm-50.yaml --out runs/r17/pb50-refwin [--rotate both] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

import llmbin
from llmbin.models import open_model


def reference_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(nsamples, seqlen)`` windows exactly as the references' ``get_wikitext2`` draws them."""
    random.seed(seed)
    starts = [random.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[i:i + seqlen] for i in starts])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stream", required=True, help=".npy of the calibration split's token ids")
    p.add_argument("--recipe", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotate", choices=["none", "input", "both"])
    p.add_argument("--out", required=True)
    p.add_argument("--json", help="write the run's report (the shape of llmbin quantize --json) here")
    args = p.parse_args()

    overrides = {"rotate": args.rotate} if args.rotate else {}
    config = llmbin.recipe_config(args.recipe, **overrides)
    stream = torch.from_numpy(np.load(args.stream)).long().flatten()
    windows = reference_windows(stream, args.nsamples, args.seqlen, args.seed)
    info = {"data": f"{args.stream} (reference windows)", "nsamples": args.nsamples, "seqlen": args.seqlen,
            "seed": args.seed}
    start = time.perf_counter()
    model = llmbin.quantize_and_save(open_model(args.model), config, windows, args.out, progress=False,
                                     calibration_info={"model": args.model, **info})
    from llmbin.bits import bit_report, directory_bytes

    report = {"model": args.model, "recipe": args.recipe, "config": config.to_dict(), "calibration": info,
              "bits_per_weight": bit_report(model)["bits_per_weight"], "disk_bytes": directory_bytes(args.out),
              "quantize_seconds": time.perf_counter() - start}
    print(f"wrote {args.out}: {report['bits_per_weight']:.3f} bits/weight")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
