"""Quantizing on several processes: seconds per block for process × thread layouts, alone and beside
a busy process, and whether the layouts write the same blocks.

Each layout is one ``llmbin quantize`` run (SmolLM2-135M by default, a recipe, ``--nsamples`` ×
``--seqlen`` calibration), stopped after ``--blocks`` blocks; its seconds per block are the median
of the run's own ``block_seconds`` (rank 0's, under torchrun), so loading and calibration capture
are left out. Layouts, one after another:

* ``1x2``: one process, 2 threads (what ``llmbin quantize`` does on this 2-core machine);
* ``1x1``: one process, 1 thread;
* ``2x1``: ``torchrun --nproc-per-node 2``, 1 thread each: windows and layers split over the two.

With ``--busy`` every layout runs again beside a busy process: 2 threads multiplying 1024 × 1024
fp32 matrices without pause, as an ``llmbin eval`` or a second quantization beside it would. The
slowdown is the busy run's seconds per block over the quiet run's.

The finished block files of layouts with the same threads per process must be identical
(``1x1`` and ``2x1``): the table says whether they are, by each file's tensor digests.

    python eval/distributed_benchmark.py --out-dir runs/distributed --busy      # = make bench-distributed

Results: ``OUT/distributed.json`` and ``OUT/distributed.md``; each run's own JSON and log stay in
``OUT/runs/`` and a finished run is not repeated (``--fresh`` repeats them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (processes, threads per process, environment); "spin" is libgomp's own default (300,000 spins before a
# waiting thread sleeps), which llmbin quantize replaces with OMP_WAIT_POLICY=PASSIVE unless either is set
LAYOUTS = {"1x2-spin": (1, 2, {"GOMP_SPINCOUNT": "300000"}), "1x2": (1, 2, {}), "1x1": (1, 1, {}), "2x1": (2, 1, {})}
BUSY = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
        "while True:\n    a = torch.tanh(a @ a)\n")


def run_layout(name: str, args, out_dir: Path, busy: bool) -> dict:
    processes, threads, extra_env = LAYOUTS[name]
    tag = f"{name}{'-busy' if busy else ''}"
    record = out_dir / "runs" / f"{tag}.json"
    if record.exists() and not args.fresh:
        return json.loads(record.read_text())
    ckpt = out_dir / "runs" / f"{tag}-ckpt"
    for stale in (ckpt, ckpt.with_name(ckpt.name + ".partial")):
        shutil.rmtree(stale, ignore_errors=True)
    report = out_dir / "runs" / f"{tag}-report.json"
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                                 if processes > 1 else [])
    command = launch + ["-m", "llmbin", "quantize", "--model", args.model, "--recipe", args.recipe,
                        "--calib-data", args.calib_data, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                        "--stop-after-blocks", str(args.blocks), "--out", str(ckpt), "--json", str(report), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **extra_env}
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        time.sleep(2 if busy else 0)  # the neighbour is at work before the run starts
        start = time.perf_counter()
        with open(out_dir / "runs" / f"{tag}.log", "w") as log:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wall = time.perf_counter() - start
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {done.returncode}); see {out_dir / 'runs' / f'{tag}.log'}")
    stats = json.loads(report.read_text())
    seconds = [float(s) for s in stats["timings"]["block_seconds"].values()]
    blocks = sorted((ckpt.with_name(ckpt.name + ".partial")).glob("block_*.safetensors"))
    from llmbin.checkpoint.digests import file_digests

    result = {"layout": name, "processes": processes, "threads": threads, "environment": extra_env, "busy": busy,
              "seconds_per_block": statistics.median(seconds), "block_seconds": seconds, "wall_seconds": wall,
              "peak_rss_mib_rank0": stats.get("peak_rss_mib"),
              "block_digests": [file_digests(b) for b in blocks], "command": " ".join(command)}
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(rows: list[dict], machine: str) -> str:
    quiet = {r["layout"]: r for r in rows if not r["busy"]}
    lines = [f"Seconds per block, median of each run's blocks ({machine}).", "",
             "| layout | processes × threads | alone s/block | beside a busy process s/block | slowdown | "
             "same blocks as 1x1 |", "|---|---|---|---|---|---|"]
    for name in LAYOUTS:
        if name not in quiet:
            continue
        q = quiet[name]
        b = next((r for r in rows if r["busy"] and r["layout"] == name), None)
        same = q["block_digests"] == quiet["1x1"]["block_digests"] if "1x1" in quiet else None
        lines.append(f"| {name} | {q['processes']} × {q['threads']} | {q['seconds_per_block']:.1f} | "
                     f"{b['seconds_per_block']:.1f} | {b['seconds_per_block'] / q['seconds_per_block']:.2f}× | "
                     if b else f"| {name} | {q['processes']} × {q['threads']} | {q['seconds_per_block']:.1f} | – | – | ")
        lines[-1] += {True: "yes", False: "no", None: "–"}[same] + " |"
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="pb-llm-30")
    p.add_argument("--calib-data", default="wikitext2")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--busy", action="store_true", help="also run every layout beside a busy process")
    p.add_argument("--fresh", action="store_true", help="run again what has a record")
    args = p.parse_args()
    (args.out_dir / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.layouts.split(","):
        for busy in (False, True) if args.busy else (False,):
            rows.append(run_layout(name, args, args.out_dir, busy))
            print(f"{name}{' beside a busy process' if busy else ''}: {rows[-1]['seconds_per_block']:.1f} s/block",
                  flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    (args.out_dir / "distributed.json").write_text(json.dumps({"machine": machine, "model": args.model,
                                                               "recipe": args.recipe, "nsamples": args.nsamples,
                                                               "seqlen": args.seqlen, "rows": rows}, indent=2) + "\n")
    text = table(rows, machine)
    (args.out_dir / "distributed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
