"""Quality benchmark: every method on one model, with one command.

For each recipe: quantize (a separate ``llmbin quantize`` process, so its wall time and peak
RSS are its own), then evaluate the saved, reloaded checkpoint's wikitext-2 perplexity (a
separate ``llmbin eval``). The float model and a bitsandbytes NF4 baseline get rows too.
Every phase writes its JSON as it finishes and is skipped on a rerun, so an interrupted
benchmark resumes where it stopped. Writes ``OUT/methods.json``, ``OUT/methods.md`` and
``OUT/methods.png`` (perplexity against true bits/weight) after every finished row.

    python eval/method_benchmark.py --out-dir runs/methods            # all recipes
    python eval/method_benchmark.py --recipes billm arb-rc --max-windows 4   # quick look
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pareto import method_family

from llmbin.data.paths import local_file

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
NF4_SCRIPT = Path(__file__).resolve().parent / "nf4_baseline.py"
# Run order: the rows the method-family issue's acceptance needs first.
DEFAULT_RECIPES = ["billm", "arb-rc", "db-llm-fdb", "gptq-w2", "arb-x", "rtn-sign", "pb-llm-10", "pb-llm-20",
                   "pb-llm-30", "pb-llm-50", "gptq-w2g128", "gptq-w3", "gptq-w3g128", "gptq-w4", "gptq-w4g128",
                   "nf4", "db-llm-fdb-distill"]


def run_phase(out_json: Path, argv: list[str], script: Path | None = None) -> dict:
    """Run one phase in its own process (``llmbin`` unless ``script``) unless its JSON exists."""
    if not out_json.exists():
        print("$", " ".join(argv), flush=True)
        command = [str(script)] if script else ["-m", "llmbin.cli"]
        subprocess.run([sys.executable, *command, *argv, "--json", str(out_json)], check=True)
    return json.loads(out_json.read_text())


def write_outputs(out: Path, settings: dict, rows: list[dict]) -> None:
    (out / "methods.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = ["| method | bits/weight | disk MiB | wikitext-2 ppl | quantize s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        bits = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "16"
        secs = f"{r['quantize_seconds']:.0f}" if r["quantize_seconds"] is not None else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else "-"
        lines.append(f"| {r['name']} | {bits} | {r['disk_bytes'] / 2**20:.1f} | {r['ppl']:.2f} | {secs} | {rss} |")
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot(out / "methods.png", rows, settings)


def plot(path: Path, rows: list[dict], settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        if r["bits_per_weight"]:
            families.setdefault(r["family"], []).append(r)
    for family, members in sorted(families.items()):
        members.sort(key=lambda r: r["bits_per_weight"])
        xs, ys = [r["bits_per_weight"] for r in members], [r["ppl"] for r in members]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(members) > 1 else "none", label=family)
        for r in members:
            ax.annotate(r["name"], (r["bits_per_weight"], r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    floats = [r for r in rows if not r["bits_per_weight"]]
    if floats:
        ax.axhline(floats[0]["ppl"], color="gray", linestyle=":", label=f"fp16 ({floats[0]['ppl']:.2f})")
    ax.set_xlabel("true bits per weight (quantized layers; every scale, mask and index counted)")
    ax.set_ylabel("wikitext-2 perplexity (log)")
    ax.set_yscale("log")
    ax.set_title(f"{settings['model']}, calibration {settings['nsamples']} x {settings['seqlen']}, seed {settings['seed']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out-dir", default="runs/methods")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES,
                   help="recipe names under recipes/ (or paths to .yaml files); 'nf4' is the bitsandbytes baseline")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick look)")
    args = p.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calib = str(local_file("wikitext2", "calibration") or "wikitext2")
    limit = ["--max-windows", str(args.max_windows)] if args.max_windows else []
    suffix = f"-w{args.max_windows}" if args.max_windows else ""
    settings = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                "calibration": calib, "eval": "wikitext-2 raw test", "eval_windows": args.max_windows or "all"}

    float_eval = run_phase(out / f"float{suffix}.json", ["eval", "--model", args.model, "--no-progress", *limit])
    done = [{"name": "fp16", "family": "fp16", "method": None, "bits_per_weight": None,
             "disk_bytes": float_eval.get("disk_bytes") or 0, "ppl": float_eval["ppl"]["wikitext2"],
             "quantize_seconds": None, "peak_rss_mib": None, "eval_seconds": float_eval["eval_seconds"]}]
    for name in args.recipes:
        recipe = Path(name) if name.endswith(".yaml") else RECIPES_DIR / f"{name}.yaml"
        tag = Path(name).stem
        ckpt = out / tag
        try:
            if tag == "nf4":
                quant = run_phase(out / f"{tag}.quantize.json", ["--model", args.model, "--out", str(ckpt)],
                                  script=NF4_SCRIPT)
                loaded = run_phase(out / f"{tag}{suffix}.eval.json", ["--model", args.model, "--eval", *limit],
                                   script=NF4_SCRIPT)
                family = "bitsandbytes NF4"
            else:
                quant = run_phase(out / f"{tag}.quantize.json", [
                    "quantize", "--model", args.model, "--recipe", str(recipe), "--calib-data", calib,
                    "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
                    "--out", str(ckpt), "--no-progress"])
                loaded = run_phase(out / f"{tag}{suffix}.eval.json",
                                   ["eval", str(ckpt), "--no-progress", "--dense-cache", *limit])
                config = quant["config"]
                family = method_family(config) + (f" g{config['group_size']}" if config.get("group_size") else "")
                family += f" rotate={config['rotate']}" if config.get("rotate", "none") != "none" else ""
        except subprocess.CalledProcessError as exc:
            print(f"{tag}: failed ({exc}); continuing with the next recipe", flush=True)
            continue
        done.append({"name": tag, "family": family, "method": quant.get("config", {}).get("method", tag),
                     "config": quant.get("config"), "bits_per_weight": quant["bits_per_weight"],
                     "disk_bytes": quant["disk_bytes"], "ppl": loaded["ppl"]["wikitext2"],
                     "quantize_seconds": quant["quantize_seconds"], "peak_rss_mib": quant["peak_rss_mib"],
                     "eval_seconds": loaded["eval_seconds"]})
        done[0]["disk_bytes"] = done[0]["disk_bytes"] or quant.get("fp16_bytes", 0)
        write_outputs(out, settings, done)
    write_outputs(out, settings, done)


if __name__ == "__main__":
    main()
