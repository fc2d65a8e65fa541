"""Benchmark: the packed-bit kernel against dense ``F.linear``, per operator and end to end.

Operator level: ``BinaryLinear.from_float`` (1 bit per weight plus a per-row scale) against
``F.linear`` with dense fp32 and bf16 weights, same shapes, same run. Each contender cycles
through enough copies of its weights (and 8 inputs) that its working set is at least twice the
last-level cache, so no one is flattered by cache hits; the figure is the median of many calls.
"rotated" is the same packed layer with ``--rotate both``: the transforms of the input and of
the output around the same kernel call.
Achieved weight bandwidth (weight bytes / time) is printed next to the machine's measured copy
bandwidth.

End to end: ``generate`` on SmolLM2-135M-Instruct, batch 1, 128 new tokens (greedy), float
model (fp32, bf16) vs its PB-LLM checkpoint (rest of the model in fp32, or in bf16), each in its
own process for honest memory figures; the packed models' first 32 greedy tokens are checked
against the plain-torch reference path.

    python eval/kernel_benchmark.py --out-dir runs/kernels [--checkpoint runs/methods/pb-llm-10]

Writes ``kernels.json`` and ``kernels.md`` in the output folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # (out N, in K)
    "llama-7b q/o (4096x4096)": (4096, 4096), "llama-7b up (11008x4096)": (11008, 4096),
    "llama-7b down (4096x11008)": (4096, 11008), "smollm2 q/o (576x576)": (576, 576),
    "smollm2 up (1536x576)": (1536, 576), "smollm2 down (576x1536)": (576, 1536)}
PROMPT = "The history of the binary numeral system begins"


def last_level_cache_bytes() -> int:
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes, default=32 << 20)


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 10) -> float:
    """GB/s of a large tensor copy, counting bytes read plus written."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def time_calls(fn, weights: list, inputs: list, min_seconds: float, max_calls: int = 2000) -> float:
    """Median seconds per call, rotating weights and inputs."""
    for i in range(3):
        fn(inputs[i % len(inputs)], weights[i % len(weights)])
    times, start, i = [], time.perf_counter(), 0
    while (time.perf_counter() - start < min_seconds or len(times) < 20) and len(times) < max_calls:
        x, w = inputs[i % len(inputs)], weights[i % len(weights)]
        t0 = time.perf_counter()
        fn(x, w)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


def copies_for(nbytes: int, llc: int) -> int:
    return max(1, min(64, math.ceil(2 * llc / max(nbytes, 1))))


def rotated_copy(layer, seed: int):
    """``layer`` with both-sided incoherence rotation (``--rotate both``): the same kernel call
    between a transform of the input and the inverse transform of the output."""
    from dataclasses import replace

    from llmbin.nn import BinaryLinear
    from llmbin.packing.rotation import LayerRotation

    return BinaryLinear(replace(layer.packed(), rotation=LayerRotation(seed, seed + 1)))


def operator_rows(shapes: dict, batches: list[int], min_seconds: float) -> list[dict]:
    from llmbin.nn import BinaryLinear

    llc = last_level_cache_bytes()
    rows = []
    for name, (N, K) in shapes.items():
        linear = torch.nn.Linear(K, N, bias=False)
        packed = BinaryLinear.from_float(linear)
        packed(torch.randn(1, K))  # build the plan once, as a loaded model does on its first call
        packed_bytes = packed.kernel_plan().planes.nbytes + packed.kernel_plan().nbytes()
        contenders = {
            "fp32": ([linear.weight.detach().clone() for _ in range(copies_for(N * K * 4, llc))], N * K * 4,
                     lambda x, w: F.linear(x, w)),
            "bf16": ([linear.weight.detach().to(torch.bfloat16) for _ in range(copies_for(N * K * 2, llc))], N * K * 2,
                     lambda x, w: F.linear(x.to(torch.bfloat16), w)),
            "packed": ([BinaryLinear.from_float(linear) for _ in range(copies_for(packed_bytes, llc))], packed_bytes,
                       lambda x, layer: layer(x)),
            "rotated": ([rotated_copy(packed, i) for i in range(copies_for(packed_bytes, llc))], packed_bytes,
                        lambda x, layer: layer(x)),
        }
        for layer in contenders["packed"][0] + contenders["rotated"][0]:
            layer(torch.randn(1, K))
        for batch in batches:
            inputs = [torch.randn(batch, K) for _ in range(8)]
            row = {"shape": name, "N": N, "K": K, "batch": batch}
            for label, (weights, nbytes, fn) in contenders.items():
                with torch.inference_mode():
                    seconds = time_calls(fn, weights, inputs, min_seconds)
                row[f"{label}_us"] = seconds * 1e6
                row[f"{label}_weight_GBps"] = nbytes / seconds / 1e9
                row[f"{label}_copies"] = len(weights)
            row["speedup_vs_fp32"] = row["fp32_us"] / row["packed_us"]
            row["speedup_vs_bf16"] = row["bf16_us"] / row["packed_us"]
            print(f"{name:28s} batch {batch:3d}: fp32 {row['fp32_us']:9.1f} us  bf16 {row['bf16_us']:9.1f} us  "
                  f"packed {row['packed_us']:9.1f} us  ({row['speedup_vs_fp32']:.1f}x fp32, "
                  f"{row['speedup_vs_bf16']:.1f}x bf16)  rotated {row['rotated_us']:9.1f} us", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- end to end (one process each)
def memory_mib() -> dict:
    """Resident set now and its lifetime peak (``VmRSS``, ``VmHWM``), in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024}


def e2e_worker(kind: str, checkpoint: str, new_tokens: int, check_tokens: int) -> dict:
    import llmbin
    from llmbin.models import load_model

    t0 = time.perf_counter()
    if kind.startswith("packed"):
        model = llmbin.load(checkpoint, dtype=torch.bfloat16 if kind == "packed-bf16" else torch.float32)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    else:
        model, tokenizer = load_model("smollm2-135m", dtype=torch.float32 if kind == "fp32" else torch.bfloat16)
    load_seconds = time.perf_counter() - t0
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up (plans, allocator)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        seconds = time.perf_counter() - t0
        result = {"kind": kind, "tokens_per_s": new_tokens / seconds, "seconds": seconds, "load_seconds": load_seconds,
                  "new_tokens": new_tokens, **memory_mib(), "text": tokenizer.decode(out[0, prompt.shape[1]:][:check_tokens])}
        if kind.startswith("packed"):
            fast = out[0, prompt.shape[1]:][:check_tokens]
            os.environ["LLMBIN_KERNEL"] = "reference"
            ref = model.generate(prompt, max_new_tokens=check_tokens, min_new_tokens=check_tokens, **kwargs)
            result["greedy_matches_reference"] = bool(torch.equal(fast, ref[0, prompt.shape[1]:]))
    return result


def e2e_rows(checkpoint: str, new_tokens: int, check_tokens: int) -> list[dict]:
    rows = []
    for kind in ("fp32", "bf16", "packed", "packed-bf16"):
        cmd = [sys.executable, __file__, "--e2e-worker", kind, "--checkpoint", checkpoint,
               "--new-tokens", str(new_tokens), "--check-tokens", str(check_tokens)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"generate {kind:6s}: {row['tokens_per_s']:.2f} tokens/s, RSS {row['rss_mib']:.0f} MiB "
              f"(peak {row['peak_rss_mib']:.0f} MiB, loading included)"
              + (f", greedy = reference: {row['greedy_matches_reference']}" if "greedy_matches_reference" in row else ""),
              flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; copy bandwidth {result['copy_GBps']:.1f} GB/s; "
             f"kernel path: {result['kernel']}", "",
             "| shape | batch | fp32 µs | bf16 µs | packed µs | × fp32 | × bf16 | packed weight GB/s | rotated µs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["operator"]:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['fp32_us']:.1f} | {r['bf16_us']:.1f} | {r['packed_us']:.1f} | "
                     f"{r['speedup_vs_fp32']:.1f} | {r['speedup_vs_bf16']:.1f} | {r['packed_weight_GBps']:.1f} | "
                     f"{r.get('rotated_us', float('nan')):.1f} |")
    if result.get("e2e"):
        lines += ["", "| SmolLM2-135M generate, batch 1 | tokens/s | × fp32 | RSS after generate MiB | peak RSS MiB (with loading) |",
                  "|---|---|---|---|---|"]
        base = next((r["tokens_per_s"] for r in result["e2e"] if r["kind"] == "fp32"), None)
        for r in result["e2e"]:
            ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
            lines.append(f"| {r['kind']} | {r['tokens_per_s']:.2f} | {ratio} | {r['rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
        for r in result["e2e"]:
            if "greedy_matches_reference" in r:
                lines.append(f"\n{r['kind']}: greedy output equals the reference path for the first "
                             f"{result['check_tokens']} tokens: {r['greedy_matches_reference']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/kernels")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: all")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each contender at least this long")
    p.add_argument("--checkpoint", default="runs/methods/pb-llm-10", help="PB-LLM checkpoint of SmolLM2 (end to end)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--skip-operator", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--e2e-worker", choices=["fp32", "bf16", "packed", "packed-bf16"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.e2e_worker:
        print(json.dumps(e2e_worker(args.e2e_worker, args.checkpoint, args.new_tokens, args.check_tokens)))
        return
    from llmbin.kernels.cpu import extension
    from llmbin.kernels.dispatch import kernel_available

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = extension()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    result = {"machine": f"{cpu}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "kernel": ("C++ " + "/".join(ext.available_isas())) if kernel_available(torch.device("cpu")) else "reference",
              "copy_GBps": copy_bandwidth(), "operator": [], "e2e": [], "check_tokens": args.check_tokens}
    print(f"{result['machine']}; copy bandwidth {result['copy_GBps']:.1f} GB/s; kernel {result['kernel']}", flush=True)
    if not args.skip_operator:
        shapes = {k: SHAPES[k] for k in (args.shapes or SHAPES)}
        result["operator"] = operator_rows(shapes, args.batches, args.min_seconds)
    if not args.skip_e2e:
        if not Path(args.checkpoint).exists():
            sys.exit(f"no checkpoint at {args.checkpoint}; create it with: llmbin quantize --model smollm2-135m "
                     f"--recipe recipes/pb-llm-10.yaml --out {args.checkpoint} (or pass --skip-e2e)")
        result["e2e"] = e2e_rows(args.checkpoint, args.new_tokens, args.check_tokens)
    (out / "kernels.json").write_text(json.dumps(result, indent=2))
    (out / "kernels.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
