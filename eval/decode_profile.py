"""Where a decode step's time goes: ``torch.profiler`` over greedy ``model.generate`` steps of a
checkpoint, after the warm-up that compiles, with the protocol of ``decode_benchmark.py`` (batch 1,
a prompt from the wikitext-2 test text, 2 threads).

Prints the ops by self CPU time per decode step, grouped by input shapes (so a rotation's small
Kronecker-factor products stand apart from attention's), and writes them as JSON::

    python eval/decode_profile.py runs/qwen/binary-g64-rotated --json runs/profile-qwen.json

or, without a checkpoint, of a model with random codes of a recipe's layout (``decode_benchmark.py
--layout``; speed depends only on the layout)::

    python eval/decode_profile.py --model QWEN.gguf --layout binary-g64-rotated+tables8

Run it alone on the CPU: the profile is a timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_benchmark import layout_model, prompt_ids

CATEGORIES = ("packed layers", "16-bit or table layers", "rotations", "attention products",
              "compiled graph (fused kernels, wrapper)", "graph entry (guards)", "other")


def category(op: str, shapes: list) -> str:
    """The part of a decode step an op belongs to. Without the rotation kernel a rotation is torch's
    products with its square Kronecker factors, the only square right operands of ``aten::mm`` here."""
    if op in ("llmbin::packed_linear", "llmbin_cpu::linear"):
        return "packed layers"
    if op in ("llmbin::half_linear", "llmbin::table_linear", "llmbin_cpu::table_linear"):
        return "16-bit or table layers"
    if op in ("llmbin::rotate", "llmbin_cpu::rotate") or (op == "aten::mm" and len(shapes) > 1 and len(shapes[1]) == 2
                                  and shapes[1][0] == shapes[1][1]):
        return "rotations"
    if op == "aten::bmm":
        return "attention products"
    if "CompiledFxGraph" in op:
        return "compiled graph (fused kernels, wrapper)"
    if any(key in op for key in ("Dynamo", "Pregraph", "Torch-Compiled Region", "AOTDispatcher")):
        return "graph entry (guards)"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, nargs="?", help="an llmbin checkpoint (or --model and --layout)")
    ap.add_argument("--model", help="with --layout: the original model (llmbin's --model)")
    ap.add_argument("--layout", help="LAYOUT[+tables8]: --model with random codes of a recipe's layout")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated in the profiled call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="static cache without torch.compile")
    ap.add_argument("--top", type=int, default=40, help="rows printed")
    ap.add_argument("--inductor-kernels", action="store_true",
                    help="time each kernel inductor generates as an op of its own (they are inside the compiled "
                         "graph's row otherwise); adds a little time to each")
    ap.add_argument("--inductor-option", action="append", default=[], metavar="KEY=JSON",
                    help="an inductor option for the decode step's compile, e.g. cpp_wrapper=true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    args = ap.parse_args()
    if (args.checkpoint is None) == (args.layout is None) or (args.layout is None) != (args.model is None):
        ap.error("give a checkpoint, or --model and --layout")

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers.generation.streamers import BaseStreamer

    import llmbin
    from llmbin.checkpoint.io import load_tokenizer
    from llmbin.evaluate.generation import time_decode

    torch.set_num_threads(args.threads)
    if args.inductor_kernels:
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True
    if args.layout:
        model, tokenizer = layout_model(args.model, args.layout)
    else:
        model, tokenizer = llmbin.load(args.checkpoint, dtype=torch.float32), load_tokenizer(args.checkpoint)
    source = f"{args.model} as {args.layout}" if args.layout else str(args.checkpoint)
    model.eval()
    llmbin.prepare_decode(model, compile=not args.eager)
    for option in args.inductor_option:
        key, _, value = option.partition("=")
        model.generation_config.compile_config.options[key] = json.loads(value)
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    time_decode(model, ids, args.new_tokens, pad)  # warm-up: kernel load, plans, compile
    warmup = time.perf_counter() - start
    _, timing = time_decode(model, ids, args.new_tokens, pad)  # unprofiled: the speed the profile should explain
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)

    class StartAtFirstToken(BaseStreamer):
        """Starts the profiler when the prefill's token arrives, so that only decode steps are in it."""

        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt, the second the prefill's token
                prof.start()

        def end(self):
            pass

    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                       eos_token_id=None, do_sample=False, temperature=None, top_p=None, top_k=None,
                       streamer=StartAtFirstToken(), pad_token_id=pad)
        prof.stop()
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    steps = args.new_tokens - 1  # the steps after the prefill's token
    profiled_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / steps / 1e3
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        rows.append({"op": event.key, "shapes": str(event.input_shapes)[:120],
                     "category": category(event.key, event.input_shapes), "calls_per_step": event.count / steps,
                     "self_us_per_step": event.self_cpu_time_total / steps,
                     "total_us_per_step": event.cpu_time_total / steps})
    rows.sort(key=lambda r: -r["self_us_per_step"])
    step_ms = 1e3 / timing["decode_tokens_per_s"]
    print(f"{source}: decode {timing['decode_tokens_per_s']:.2f} tokens/s ({step_ms:.1f} ms a step) unprofiled, "
          f"{profiled_ms:.1f} ms a step of self CPU time profiled; warm-up {warmup:.0f} s. Per decode step:")
    print(f"{'self us':>9} {'total us':>9} {'calls':>6}  op  shapes")
    for r in rows[:args.top]:
        print(f"{r['self_us_per_step']:9.0f} {r['total_us_per_step']:9.0f} {r['calls_per_step']:6.1f}  {r['op']}  {r['shapes']}")
    parts = {c: sum(r["self_us_per_step"] for r in rows if r["category"] == c) / 1e3 for c in CATEGORIES}
    print("by part, ms a step: " + ", ".join(f"{c} {ms:.1f}" for c, ms in parts.items()))
    if args.json:
        kept = [r for r in rows if r["self_us_per_step"] >= 1.0]
        args.json.write_text(json.dumps({"checkpoint": source, "threads": args.threads,
                                         "compiled": not args.eager, "prompt_tokens": args.prompt_tokens,
                                         "new_tokens": args.new_tokens, "warmup_seconds": warmup,
                                         "decode_tokens_per_s": timing["decode_tokens_per_s"],
                                         "profiled_self_ms_per_step": profiled_ms, "ms_per_step_by_part": parts,
                                         "ops_note": f"ops of at least 1 us a step ({len(kept)} of {len(rows)}); "
                                                     f"ms_per_step_by_part sums all {len(rows)}",
                                         "ops": kept}, indent=1) + "\n")


if __name__ == "__main__":
    main()
