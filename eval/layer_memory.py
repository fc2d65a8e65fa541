"""Peak memory of one layer through the layer pipeline, phase by phase: the rotation, the method's
fit and the scale refit, for a random-weight linear of a real model's shape.

    python eval/layer_memory.py [--shape 1536x8960] [--recipe db-llm-fdb] [--rotate input] [--json FILE]

Resident memory (``/proc/self/statm``) is sampled every 2 ms on a thread; each phase reports its
peak above the memory at its start, and the stack where the peak was seen. The inputs (``W`` and
its ``K × K`` Hessian, float32) exist before the first phase. RSS also holds what the allocator
keeps after a free, so a phase may start higher than the last one ended in tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

import torch

import llmbin.algorithms.layer as layer
from llmbin.algorithms.incoherence import layer_rotation
from llmbin.recipes import recipe_config
from llmbin.registry import method_function


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    def __init__(self) -> None:
        self.main, self.peak, self.stack = threading.get_ident(), 0.0, ""
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            rss = _rss_mib()
            if rss > self.peak:
                frame = sys._current_frames().get(self.main)
                self.peak, self.stack = rss, "".join(traceback.format_stack(frame)[-3:]) if frame else ""
            time.sleep(0.002)

    def measure(self, name: str, fn, phases: list):
        def wrapped(*args, **kwargs):
            start = _rss_mib()
            self.peak = start
            out = fn(*args, **kwargs)
            phases.append({"phase": name, "start_mib": start, "peak_mib": self.peak, "above_start_mib": self.peak - start,
                           "where": self.stack.strip().splitlines()[-1].strip() if self.stack else ""})
            return out
        return wrapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1536x8960", help="OUTxIN of the linear (default: Qwen2.5-1.5B's down_proj)")
    p.add_argument("--recipe", default="db-llm-fdb")
    p.add_argument("--rotate", choices=["none", "input", "both"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    N, K = (int(v) for v in args.shape.lower().split("x"))
    config = recipe_config(args.recipe, **({"rotate": args.rotate} if args.rotate else {}))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, K, generator=g) * torch.linspace(0.2, 3.0, K)
    H = 2 * X.T @ X / X.shape[0]
    del X
    W = torch.randn(N, K, generator=g) * 0.02
    sampler, phases = PeakSampler(), []
    layer.rotate_problem = sampler.measure("rotation", layer.rotate_problem, phases)
    layer.refit_stage = sampler.measure("scale refit", layer.refit_stage, phases)
    method = sampler.measure("method", method_function(config), phases)
    inputs, start = _rss_mib(), time.perf_counter()
    layer.quantize_layer(method, W, H, config, layer_rotation(config, "0.mlp.down_proj"))
    record = {"shape": [N, K], "recipe": args.recipe, "rotate": config.rotate, "threads": args.threads,
              "inputs_mib": (W.numel() + H.numel()) * 4 / 2**20, "rss_with_inputs_mib": inputs,
              "seconds": time.perf_counter() - start, "phases": phases,
              "peak_above_inputs_mib": max(ph["peak_mib"] for ph in phases) - inputs}
    for ph in phases:
        print(f"{ph['phase']:>12}: peak {ph['peak_mib']:.0f} MiB, +{ph['above_start_mib']:.0f} over its start "
              f"({ph['where']})")
    print(f"layer {N}x{K} {args.recipe} rotate={config.rotate}: peak +{record['peak_above_inputs_mib']:.0f} MiB "
          f"over the inputs ({record['rss_with_inputs_mib']:.0f} MiB with W and H), {record['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
