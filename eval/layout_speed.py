"""Batch-1 speed of the packed layers of one decode step, by checkpoint layout, on a real model's shapes.

``eval/kernel_benchmark.py`` times one layout (a sign plane with a scale per row) on Llama and
SmolLM2 shapes. Decode speed depends on the layout too: groups of 64 columns give each 16-row tile
a coefficient per group and product, and a mean adds a constant product. This script builds
random packed layers of a given layout for every linear of one decoder block (Qwen2.5-1.5B by
default: q/o 1536 x 1536, k/v 256 x 1536, gate/up 8960 x 1536, down 1536 x 8960), times
``BinaryLinear`` calls at batch 1 (the model's path: plan built once, then the operator), each
layer cycling through enough copies to exceed twice the last-level cache, and reports the median
microseconds per call and the packed layers' milliseconds per decode step (blocks x the block's sum).
The values are random: speed depends only on the layout and the shapes. ``random_layout`` puts
such layers into a whole float model (``eval/decode_benchmark.py --layout``), for decode rows of
layouts and shapes that have no calibrated checkpoint here.

    python eval/layout_speed.py --json runs/layout-speed.json

To compare two versions of the kernels, run the same script against each tree
(``PYTHONPATH=OTHER_TREE python eval/layout_speed.py``), one after the other on an idle machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

import torch
from kernel_benchmark import copies_for, last_level_cache_bytes, time_calls

QWEN_BLOCK = {"q_proj": (1536, 1536), "k_proj": (256, 1536), "v_proj": (256, 1536), "o_proj": (1536, 1536),
              "gate_proj": (8960, 1536), "up_proj": (8960, 1536), "down_proj": (1536, 8960)}
LAYOUTS = {  # the layouts of published recipes: (planes, group size (0: one group per row), a mean, rotated input,
    # salient fraction: PB-LLM's 8-bit values at random positions, as spread as its chosen ones)
    "binary-g64": (1, 64, True, False, 0.0),  # binary-g64-rotated without its rotation: 1.5 bits
    "binary-g64-rotated": (1, 64, True, True, 0.0),
    "db-llm-fdb": (2, 0, True, False, 0.0),  # FDB: two planes, α per plane and μ per row, about 2.02 bits
    "db-llm-fdb-rotate-input": (2, 0, True, True, 0.0),  # the Qwen page's best point at about 2 bits
    "pb-llm-10": (1, 0, True, False, 0.1),  # PB-LLM 10 %: a plane with α and μ per row, 10 % 8-bit salient values
    "sign-per-row": (1, 0, False, False, 0.0),  # rtn-sign and BinaryLinear.from_float
}


def random_packed(layout: str, N: int, K: int, seed: int):
    """A ``PackedWeight`` of ``layout`` with random codes and scales (speed depends only on the layout)."""
    from llmbin.packing.packed_weight import PackedWeight
    from llmbin.packing.rotation import LayerRotation

    planes, group_size, mean, rotated, salient = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    gs = group_size or K
    G = -(-K // gs)
    bits = torch.rand(planes, N, K, generator=g) < 0.5
    alpha = (torch.rand(planes, N, G, generator=g) + 0.1) * 0.02
    mu = torch.randn(1, N, G, generator=g) * 0.002 if mean else None
    extra = {}
    if salient:
        mask = torch.zeros(N * K, dtype=torch.bool)
        mask[torch.randperm(N * K, generator=g)[:round(salient * N * K)]] = True  # PB-LLM's count (salient_mask)
        extra = dict(salient_mask=mask.view(N, K),
                     salient_mag=torch.randint(0, 128, (N, K), generator=g, dtype=torch.int16),
                     salient_scale=(torch.rand(N, generator=g) + 0.1) * 0.001, salient_bits=8)
    pw = PackedWeight.from_codes(bits, alpha, mu, gs, terms=[(p, 0) for p in range(planes)], means=[0] if mean else [],
                                 **extra)
    return dataclasses.replace(pw, rotation=LayerRotation(seed)) if rotated else pw


def random_layer(layout: str, N: int, K: int, seed: int, bias: torch.Tensor | None = None):
    from llmbin.nn import BinaryLinear

    return BinaryLinear(random_packed(layout, N, K, seed), bias)


@torch.no_grad()
def random_layout(model: torch.nn.Module, layout: str) -> int:
    """Replace every linear of every decoder block of a float model by a random packed layer of
    ``layout`` (biases kept): a model with the layout's speed, and nonsense outputs. Returns the count."""
    from llmbin.models import decoder_layers, linear_layers
    from llmbin.nn.tree import set_submodule

    count = 0
    for index, block in enumerate(decoder_layers(model)):
        for name, linear in linear_layers(block).items():
            N, K = linear.weight.shape
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
            set_submodule(block, name, random_layer(layout, N, K, seed=1000 * index + count, bias=bias))
            count += 1
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["binary-g64", "db-llm-fdb", "sign-per-row"])
    p.add_argument("--blocks", type=int, default=28, help="decoder blocks per step (Qwen2.5-1.5B: 28)")
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--json")
    args = p.parse_args()

    import llmbin

    llc = last_level_cache_bytes()
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "llmbin": os.path.dirname(llmbin.__file__), "blocks": args.blocks, "rows": []}
    for name in args.layouts:
        block_us = 0.0
        for layer_name, (N, K) in QWEN_BLOCK.items():
            first = random_layer(name, N, K, 0)
            first(torch.randn(1, K))  # the plan, built once as a loaded model does on its first call
            nbytes = first.kernel_plan().planes.nbytes + first.kernel_plan().nbytes()
            layers = [first] + [random_layer(name, N, K, i) for i in range(1, copies_for(nbytes, llc))]
            for layer in layers:
                layer(torch.randn(1, K))
            inputs = [torch.randn(1, K) for _ in range(8)]
            with torch.inference_mode():
                seconds = time_calls(lambda x, layer: layer(x), layers, inputs, args.min_seconds)
            block_us += seconds * 1e6
            row = {"layout": name, "layer": layer_name, "N": N, "K": K, "us": seconds * 1e6,
                   "plan_bytes": nbytes, "GBps": nbytes / seconds / 1e9, "copies": len(layers)}
            result["rows"].append(row)
            print(f"{name:18s} {layer_name:9s} {N:5d}x{K:<5d} {row['us']:8.1f} us  {row['GBps']:5.1f} GB/s of plan",
                  flush=True)
        step_ms = block_us * args.blocks / 1e3
        result["rows"].append({"layout": name, "layer": "decode step", "ms": step_ms})
        print(f"{name}: {step_ms:.2f} ms of packed layers per decode step ({args.blocks} blocks)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
