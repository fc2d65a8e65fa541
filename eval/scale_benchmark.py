"""Scale benchmark: memory and time of ``llmbin quantize`` / ``llmbin eval`` at real model shapes.

Random-weight checkpoints with Llama-2-7B's shape (bf16, 32 blocks) and Llama-2-70B's shape
(bf16, 2 blocks: per-block memory is what matters) are written once by ``random_checkpoint.py``.
Each phase is one ``llmbin`` process (so its peak RSS is its own), run as a user would run it,
with random words for text (random token ids are fine for memory and time):

* ``7b-memory``: PB-LLM at 128 × 2048 calibration, activations in memory, stopped after
  ``--blocks`` blocks (a full 32-block run at this calibration takes about a day on 2 cores);
* ``7b-offload``: the same with ``--offload-activations``;
* ``70b-offload``: one block of the 70B shape with ``--offload-activations``, at ``--nsamples-70b``
  windows of 2048 (8 by default: a 70B block at 128 × 2048 is about 1.4 PFLOP, some 4 hours on
  2 cores; with offloaded activations one window is resident at a time, so the number of windows
  changes the time, not the peak RSS);
* ``7b-checkpoint``: all 32 blocks with a small calibration (4 × 512) and ``--no-refit-scales``
  (the float64 scale refit is most of a block's time at this calibration), for the packed
  checkpoint: its layout, size and serving memory are those of any PB-LLM 10 % checkpoint;
* ``7b-eval``: loading that checkpoint and one 2048-token perplexity window on the CPU kernels.

The full-run figure is extrapolated: capture time + blocks × mean seconds per block. Every phase
writes its JSON as it finishes and is skipped on a rerun; ``OUT/scale.json`` and ``OUT/scale.md``
hold the table.

    python eval/scale_benchmark.py --out-dir runs/scale                 # = make bench-scale
    python eval/scale_benchmark.py --out-dir runs/scale --phases 70b-offload
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("7b-memory", "7b-offload", "70b-offload", "7b-checkpoint", "7b-eval")
MODELS = {"7b": ("llama-2-7b", None), "70b": ("llama-2-70b", 2)}


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                                                  / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version()}


def ensure_inputs(out: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from random_checkpoint import llama_config, write_checkpoint, write_random_text

    paths = {}
    for key, (shape, layers) in MODELS.items():
        folder = out / "models" / (f"{shape}-random" if layers is None else f"{shape}-random-{layers}l")
        if not (folder / "config.json").exists():
            print(f"writing {folder}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            write_checkpoint(folder, llama_config(shape, layers))
        paths[key] = folder
    for name, words, seed in (("calib.txt", 128 * 2048 + 4096, 1), ("eval.txt", 2 * 2048 + 16, 2)):
        if not (out / name).exists():
            write_random_text(out / name, words, 32000, seed)
        paths[name] = out / name
    return paths


def run(out: Path, name: str, argv: list[str]) -> dict:
    result = out / f"{name}.json"
    if result.exists():
        return json.loads(result.read_text())
    print("$ llmbin", " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "llmbin.cli", *argv, "--json", str(result)], check=True)
    return json.loads(result.read_text())


def quantize_args(model: Path, calib: Path, out: Path, nsamples: int, seqlen: int, extra: list[str]) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f"{out.name}.partial", ignore_errors=True)
    return ["quantize", "--model", str(model), "--method", "pb-llm", "--calib-data", str(calib), "--nsamples",
            str(nsamples), "--seqlen", str(seqlen), "--seed", "0", "--out", str(out), "--no-progress", *extra]


def row(name: str, layers: int, report: dict) -> dict:
    timing = report.get("timings") or {}
    per_block = list((timing.get("block_seconds") or {}).values())
    mean = sum(per_block) / len(per_block) if per_block else None
    return {"phase": name, "peak_rss_gib": report["peak_rss_mib"] / 1024,
            "calibration": f"{report['calibration']['nsamples']} x {report['calibration']['seqlen']}"
            if "calibration" in report else "-",
            "blocks_run": len(per_block) if per_block else None, "seconds_per_block": mean,
            "capture_seconds": timing.get("capture_seconds"),
            "extrapolated_full_run_hours": (timing.get("capture_seconds", 0) + layers * mean) / 3600 if mean else None,
            "disk_gib": report["disk_bytes"] / 2**30 if report.get("disk_bytes") else None,
            "load_peak_rss_gib": report["load_peak_rss_mib"] / 1024 if report.get("load_peak_rss_mib") else None,
            "seconds": report.get("quantize_seconds") or report.get("eval_seconds"),
            "ppl": (report.get("ppl") or {}).get("wikitext2")}


def table(rows: list[dict]) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| phase | calibration | peak RSS GiB | after loading GiB | s/block | full run (extrapolated) h "
             "| checkpoint GiB | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['calibration']} | {r['peak_rss_gib']:.2f} | {fmt(r.get('load_peak_rss_gib'), '.2f')} "
                     f"| {fmt(r['seconds_per_block'], '.0f')} "
                     f"| {fmt(r['extrapolated_full_run_hours'], '.1f')} | {fmt(r['disk_gib'], '.2f')} "
                     f"| {fmt(r['seconds'], '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/scale"))
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    parser.add_argument("--blocks", type=int, default=1, help="blocks quantized at 128 x 2048 in the 7B phases")
    parser.add_argument("--nsamples-70b", type=int, default=8, help="2048-token windows in the 70b-offload phase")
    args = parser.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    inputs = ensure_inputs(out)
    acts, work = out / "activations", out / "work"
    stop = ["--stop-after-blocks", str(args.blocks)]
    argv = {
        "7b-memory": quantize_args(inputs["7b"], inputs["calib.txt"], work / "7b-memory", 128, 2048, stop),
        "7b-offload": quantize_args(inputs["7b"], inputs["calib.txt"], work / "7b-offload", 128, 2048,
                                    stop + ["--offload-activations", str(acts)]),
        "70b-offload": quantize_args(inputs["70b"], inputs["calib.txt"], work / "70b-offload", args.nsamples_70b, 2048,
                                     ["--stop-after-blocks", "1", "--offload-activations", str(acts)]),
        "7b-checkpoint": None,  # built when it runs: it removes a previous checkpoint
        "7b-eval": ["eval", str(out / "llama-2-7b-pb-llm"), "--eval-data", str(inputs["eval.txt"]), "--seqlen", "2048",
                    "--max-windows", "1", "--no-progress"],
    }
    layers = {"7b-memory": 32, "7b-offload": 32, "70b-offload": 80, "7b-checkpoint": 32, "7b-eval": 0}
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in PHASES if (out / f"{name}.json").exists()}
    for name in phases:
        if name in results:
            continue
        if name == "7b-checkpoint":
            argv[name] = quantize_args(inputs["7b"], inputs["calib.txt"], out / "llama-2-7b-pb-llm", 4, 512,
                                       ["--no-refit-scales"])
        results[name] = run(out, name, argv[name])
        shutil.rmtree(work / f"{name}.partial", ignore_errors=True)
    rows = [row(name, layers[name], results[name]) for name in PHASES if name in results]
    (out / "scale.json").write_text(json.dumps({"machine": machine(), "rows": rows, "reports": results}, indent=2) + "\n")
    text = table(rows)
    (out / "scale.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
