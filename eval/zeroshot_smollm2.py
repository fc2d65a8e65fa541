"""Benchmark: zero-shot accuracy of SmolLM2-135M-Instruct, float and its PB-LLM checkpoint, on
PIQA, ARC-Easy, ARC-Challenge, WinoGrande and HellaSwag (full sets) through lm-eval.

Each model runs as its own ``llmbin eval`` process on the saved, reloaded checkpoint. Scored
requests are cached in SQLite under OUT_DIR, so an interrupted run resumes; a finished model's
JSON is reused. Task data: the local copies (``--task-data``, ``$LLMBIN_TASK_DATA`` or
``../shared/data/zeroshot``), else the hub. Writes OUT_DIR/zeroshot.{json,md}.

    python eval/zeroshot_smollm2.py --out-dir runs/zeroshot --checkpoint runs/methods/pb-llm-10
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from llmbin.evaluate.zeroshot import DEFAULT_TASKS as TASKS


def run(out_dir: Path, name: str, target: list[str], args) -> dict:
    name += f"-limit{args.limit}" if args.limit else ""  # a quick look never stands in for the full sets
    out_json = out_dir / f"{name}.json"
    if not out_json.exists():
        cmd = [sys.executable, "-m", "llmbin.cli", "eval", *target, "--tasks", ",".join(TASKS), "--batch-size",
               str(args.batch_size), "--cache", str(out_dir / f"{name}.cache"), "--json", str(out_json)]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        cmd += ["--task-data", args.task_data] if args.task_data else []
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(out_json.read_text())


def markdown(results: dict) -> str:
    names = list(results)
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            if metric not in results[names[0]]["tasks"][task]:
                continue
            cells = []
            for n in names:
                value, err = results[n]["tasks"][task][metric], results[n]["stderr"][task].get(metric)
                cells.append(f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if err is not None else ""))
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    lines.append("| average (5 tasks) | acc | " + " | ".join(f"{100 * results[n]['average']:.1f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/zeroshot")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", default="runs/methods/pb-llm-10", help="the PB-LLM checkpoint (llmbin quantize)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="only the first N examples per task (quick look; the table needs none)")
    p.add_argument("--task-data")
    args = p.parse_args()
    if not Path(args.checkpoint).is_dir():
        sys.exit(f"no checkpoint at {args.checkpoint}; create it with: llmbin quantize --model {args.model} "
                 f"--recipe recipes/pb-llm-10.yaml --out {args.checkpoint}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"float": run(out, "float", ["--model", args.model], args),
               "pb-llm-10": run(out, "pb-llm-10", [args.checkpoint], args)}
    (out / "zeroshot.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "zeroshot.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
