"""What PB-LLM's searches cost per layer: one random-weight linear of a real model's shape, quantized
with ``scale_search`` 0 (one GPTQ pass), with six passes left to right, and with the default (six
passes in each of two column orders, ``order_search``), same Hessian.

    python eval/scale_search_cost.py [--shape 4096x4096] [--salient-frac 0.1] [--threads 1] [--json FILE]

The Hessian comes from random inputs with unevenly scaled features, as real layers have. Times
are wall-clock seconds of ``pbllm_quantize`` and the scale refit stage after it (mask, fits, GPTQ
passes and the refit), as the driver runs a layer.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from llmbin.algorithms.layer import quantize_layer
from llmbin.algorithms.pbllm import pbllm_quantize
from llmbin.config import PBLLMConfig, make_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x4096", help="OUTxIN of the linear, e.g. 4096x11008")
    p.add_argument("--salient-frac", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    N, K = (int(v) for v in args.shape.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, K, generator=g) * torch.linspace(0.2, 3.0, K)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(N, K, generator=g) * 0.02
    rows = []
    for passes, orders in ((0, False), (PBLLMConfig.scale_search, False), (PBLLMConfig.scale_search, PBLLMConfig.order_search)):
        start = time.perf_counter()
        config = make_config("pb-llm", salient_frac=args.salient_frac, scale_search=passes, order_search=orders)
        quantize_layer(pbllm_quantize, W, H, config)
        rows.append({"shape": args.shape, "salient_frac": args.salient_frac, "scale_search": passes, "order_search": orders,
                     "threads": args.threads, "seconds": round(time.perf_counter() - start, 2)})
    print("| shape | salient | scale_search | order_search | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['salient_frac']:.0%} | {r['scale_search']} | {r['order_search']} | {r['seconds']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
