"""Per-call speed of the kernels a decode step calls, at Qwen2.5-1.5B's shapes, batch 1.

Three measurements (``--part``, all by default):

* ``table``: the output matrix (151,936 x 1536, random values) as an 8-bit and a 4-bit table with
  64-column groups (``llmbin::table_linear``'s kernel) and in fp16 (``half_linear``), ms a call;
* ``rotate``: one rotated layer's input transform (``rotate_cpu.cpp``) of a 1536- and an
  8960-wide row, called directly, µs a call;
* ``chain``: a compiled chain of the 196 block linears of 28 blocks (random codes of
  ``--layout``, ``eval/layout_speed.py``) with a little elementwise work between them, ms a call.
  ``--python-ops`` makes the trace call ``torch.ops.llmbin`` (Python implementations) instead of
  ``torch.ops.llmbin_cpu`` (the C++ kernels registered with the dispatcher); a tree without the
  latter always does.

Run it alone on the CPU (it is a timing), e.g. two trees in turn::

    for tree in BEFORE_TREE .; do PYTHONPATH=$tree python eval/op_speed.py --part table --part rotate; done
    python eval/op_speed.py --part chain --python-ops; python eval/op_speed.py --part chain
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout_speed import LAYOUTS, QWEN_BLOCK, random_layer  # noqa: E402

VOCAB, HIDDEN = 151_936, 1536


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def mean_us(fn, calls: int) -> float:
    for _ in range(100):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def table_part() -> dict:
    from llmbin.kernels.half import half_linear
    from llmbin.kernels.table import table_linear
    from llmbin.packing.table import QuantTable

    W = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0)).mul_(0.02).half()
    x = torch.randn(1, HIDDEN)
    out = {"fp16 ms": median_ms(lambda: half_linear(x, W), 15)}
    for bits in (8, 4):
        table = QuantTable.quantize(W, bits, 64)
        out[f"{bits}-bit ms"] = median_ms(lambda: table_linear(x, table), 15)
    return out


def rotate_part() -> dict:
    from llmbin.kernels.cpu import extension
    from llmbin.packing.rotation import OrthogonalTransform

    ext = extension()
    out = {}
    for n in (1536, 8960):
        T = OrthogonalTransform(n, 1)
        # rotate._kernel_factors, spelled out so that trees from before it can be timed too
        odd = T.factors[-1] if T.factors and T.factors[-1].shape[0] % 2 else torch.empty(0, 0)
        x, y = torch.randn(1, n), torch.empty(1, n)
        out[f"{n} us"] = mean_us(lambda: ext.kron_transform(x, T.signs, n // max(1, odd.shape[0]), odd, False, y),
                                 3000)
    return out


def chain_part(layout: str, python_ops: bool) -> dict:
    import llmbin.kernels.ops as ops
    import llmbin.kernels.rotate as rotate
    import llmbin.kernels.table as table

    if python_ops:
        for module in (ops, rotate, table):
            if hasattr(module, "cpu_ops_ready"):
                module.cpu_ops_ready = lambda: False
    blocks = [{name: random_layer(layout, N, K, 100 * b + i) for i, (name, (N, K)) in enumerate(QWEN_BLOCK.items())}
              for b in range(28)]

    def step(x):
        for blk in blocks:
            q, k, v = blk["q_proj"](x), blk["k_proj"](x), blk["v_proj"](x)
            x = x + blk["o_proj"](q) * 1e-3 + (k.sum() + v.sum()) * 1e-6
            h = torch.nn.functional.silu(blk["gate_proj"](x)) * blk["up_proj"](x)
            x = x + blk["down_proj"](h) * 1e-3
        return x

    x = torch.randn(1, HIDDEN)
    with torch.inference_mode():
        step(x)  # eager once: plans and rotation transforms built, as a loaded model's first call does
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        compiled(x)
        runs = [median_ms(lambda: compiled(x), 30) for _ in range(3)]
    return {"layout": layout, "ops": "torch.ops.llmbin" if python_ops else "torch.ops.llmbin_cpu where built",
            "ms per chain (3 runs)": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", action="append", choices=["table", "rotate", "chain"])
    p.add_argument("--layout", default="binary-g64-rotated", choices=list(LAYOUTS))
    p.add_argument("--python-ops", action="store_true", help="chain: trace calls through torch.ops.llmbin")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import llmbin

    result = {"llmbin": os.path.dirname(llmbin.__file__), "threads": args.threads}
    for part in args.part or ["table", "rotate", "chain"]:
        result[part] = {"table": table_part, "rotate": rotate_part,
                        "chain": lambda: chain_part(args.layout, args.python_ops)}[part]()
        print(part, json.dumps(result[part]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
