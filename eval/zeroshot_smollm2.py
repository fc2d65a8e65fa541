"""Benchmark: zero-shot accuracy of SmolLM2-135M-Instruct, float and its PB-LLM checkpoint, on
PIQA, ARC-Easy, ARC-Challenge, WinoGrande and HellaSwag (full sets) through lm-eval.

Each task is scored in shards of ``--shard-docs`` documents (``eval/zeroshot_shards.py``); every
finished shard is saved as RESULTS_DIR/MODEL/TASK-START-END.json (lm-eval's per-document metrics)
and skipped when the script runs again, so the run, hours on a CPU, can be split over sessions and
machines. The shards are merged with lm-eval's own aggregation into RESULTS_DIR/zeroshot.{json,md}
after every shard; tasks not yet complete show how many documents are scored. The PB-LLM model is
the saved checkpoint, reloaded, running on the packed kernels. Scored requests are also cached in
SQLite under --cache-dir, so an interrupted shard resumes. Task data: the local copies
(``--task-data``, ``$LLMBIN_TASK_DATA`` or ``../shared/data/zeroshot``), else the hub.

    python eval/zeroshot_smollm2.py --checkpoint runs/methods/pb-llm-10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import zeroshot_shards as shards

from llmbin.evaluate.zeroshot import DEFAULT_TASKS as TASKS


def load_models(args) -> dict:
    """name -> a function returning (model, tokenizer), loaded only when a shard of it is missing."""
    def float_model():
        from llmbin.models import load_model
        return load_model(args.model)

    def packed_model():
        from transformers import AutoTokenizer

        import llmbin
        return llmbin.load(args.checkpoint), AutoTokenizer.from_pretrained(args.checkpoint)

    return {"float": float_model, "pb-llm-10": packed_model}


def markdown(merged: dict) -> str:
    names = list(merged)
    tasks = list(merged[names[0]]["scored"])
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            if metric == "acc_norm" and task == "winogrande":
                continue
            cells = []
            for n in names:
                done, total = merged[n]["scored"][task]
                if task not in merged[n]["tasks"]:
                    cells.append(f"{done}/{total} docs scored")
                    continue
                value, err = merged[n]["tasks"][task][metric], merged[n]["stderr"][task].get(metric)
                cells.append(f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if err is not None else ""))
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    avg = [f"{100 * merged[n]['average']:.1f}" if merged[n]["average"] is not None else "–" for n in names]
    lines.append(f"| average ({len(tasks)} tasks) | acc | " + " | ".join(avg) + " |")
    return "\n".join(lines) + "\n"


def write_summary(results_dir: Path, tasks: dict) -> dict:
    merged = {name: shards.merge(shards.load_shards(results_dir / name), tasks) for name in ("float", "pb-llm-10")}
    (results_dir / "zeroshot.json").write_text(json.dumps(merged, indent=2) + "\n")
    (results_dir / "zeroshot.md").write_text(markdown(merged))
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="eval/results/zeroshot", help="shards and the merged table")
    p.add_argument("--cache-dir", default="runs/zeroshot", help="lm-eval's request cache (resumes a shard)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", default="runs/methods/pb-llm-10", help="the PB-LLM checkpoint (llmbin quantize)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-docs", type=int, default=1000, help="documents per shard")
    p.add_argument("--stop-after", type=float, help="start no new shard after this many minutes")
    p.add_argument("--task-data")
    args = p.parse_args()
    if not Path(args.checkpoint).is_dir():
        sys.exit(f"no checkpoint at {args.checkpoint}; create it with: llmbin quantize --model {args.model} "
                 f"--recipe recipes/pb-llm-10.yaml --scale-search 0 --no-order-search --calib-data ../shared/data/wikitext/wikitext-2-v1/"
                 f"validation-00000-of-00001.parquet --nsamples 32 --seqlen 2048 --seed 0 --out {args.checkpoint}")
    began = time.monotonic()
    results, cache = Path(args.results_dir), Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tasks = shards.load_tasks(list(TASKS), args.task_data)
    todo = shards.plan({t: len(tasks[t].eval_docs) for t in TASKS}, args.shard_docs)
    loaders, loaded = load_models(args), {}
    # Shard by shard, both models in turn: a partial run already compares them on the same documents.
    for task, start, end in todo:
        for name, loader in loaders.items():
            path = shards.shard_path(results / name, task, start, end)
            if path.exists():
                continue
            if args.stop_after is not None and time.monotonic() - began > 60 * args.stop_after:
                print(f"--stop-after {args.stop_after} min reached; rerun to continue", flush=True)
                print(markdown(write_summary(results, tasks)))
                return
            if name not in loaded:
                model, tokenizer = loader()
                loaded[name] = model, tokenizer, shards.model_sha256(model)
                earlier = {s["model_sha256"] for s in shards.load_shards(results / name)} - {loaded[name][2]}
                if earlier:
                    sys.exit(f"{results / name} holds shards of other weights than {name} has now (model_sha256 "
                             f"{loaded[name][2][:12]} vs {min(earlier)[:12]}); re-create the same checkpoint, "
                             "or move those shards away to start over")
            model, tokenizer, sha = loaded[name]
            print(f"{name}: {task} documents {start}..{end - 1}", flush=True)
            shard = shards.run_shard(model, tokenizer, task, start, end, sha256=sha, batch_size=args.batch_size,
                                     task_data=args.task_data, cache=cache / f"{name}.cache")
            shards.save_shard(shard, path)
            write_summary(results, tasks)
    print(markdown(write_summary(results, tasks)))


if __name__ == "__main__":
    main()
