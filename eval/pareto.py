"""Perplexity per true bit: every measured setting of one model in one table and one plot, with llama.cpp as the peer.

Collects finished runs and merges them into a record of rows (``--record``, committed under
``docs/`` so that rows measured on other machines or in earlier sessions stay in the table):

* llmbin runs: in each ``--runs`` folder, every ``NAME.quant.json`` (``llmbin quantize --json``)
  with its ``NAME.full.json`` (``llmbin eval CKPT --ppl wikitext2 --json``), and a method
  benchmark's ``methods.json``; ``NAME.e2e-*.json`` (``eval/kl_pass.py NAME --json``) adds the same
  checkpoint after the end-to-end pass as a row of its own;
* llama.cpp GGUF files: ``--gguf FILE.gguf=EVAL.json``, bits counted from the file's tensor types
  (``eval/gguf_bits.py``), perplexity from ``llmbin eval --model FILE.gguf --json``.

By default only evaluations of the whole test split count. With ``--windows N`` every row is the
perplexity of the first N windows: taken from a longer run's per-window NLLs (``window_nll`` in
``llmbin eval --json``) or from a run with ``--max-windows N``, so that full runs and prefix runs
of one protocol share a table.

A row is keyed by its setting, calibration seed and machine (with its thread count: checkpoints differ
between CPUs and thread counts, docs/reproducibility.md); a newer measurement of the same key
replaces the old one. Settings run with several seeds get
their median and range. The table marks the Pareto front (no other setting has fewer or equal
bits and a lower perplexity).

    python eval/pareto.py --runs runs/r17 --gguf /work/llamacpp/smollm2-IQ1_S.gguf=runs/r17/gguf-IQ1_S.full.json \\
        --record docs/pareto-smollm2.json --plot docs/methods-smollm2.png

Writes the record (JSON), ``--table`` (markdown, default next to the record) and ``--plot``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from pathlib import Path

from gguf_bits import gguf_linear_bits


def this_machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    import os

    return f"{model}, {os.cpu_count()} cores"


OLD_PBLLM = " (no α search)"


def method_family(config: dict) -> str:
    """The method a run's recorded config is: ARB-X is BiLLM with alternating refinement (its recipe
    sets ``refine_iters``), and older records still name it ``arb-x``."""
    method = config["method"]
    family = "arb-x" if method == "billm" and config.get("refine_iters", 0) > 0 else method
    if method == "db-llm" and config.get("planes", 2) != 2:  # 2 planes is FDB; one is a sign code
        family += f" {config['planes']}-plane"
    return family + (" mix" if config.get("layers") else "")  # per-layer rules: a line of its own
NO_ORDER_SEARCH = " (no order search)"


def eval_ppl(evaluated: dict, windows: int | None) -> float | None:
    """The perplexity an ``llmbin eval --json`` record gives for the protocol: the whole test split
    (``windows`` None), or its first ``windows`` windows; None if the record does not cover it."""
    nlls, limit = evaluated.get("window_nll"), evaluated.get("max_windows")
    if windows is None:
        return None if limit else evaluated["ppl"]["wikitext2"]
    if nlls is not None and len(nlls) >= windows:
        return math.exp(sum(nlls[:windows]) / windows)
    return evaluated["ppl"]["wikitext2"] if limit == windows else None


def llmbin_row(quant: dict, evaluated: dict, source: str, machine: str, windows: int | None = None) -> dict:
    config = quant["config"]
    recipe = Path(quant.get("recipe") or config["method"]).stem.removesuffix("-rotated").removesuffix("-ss6").removesuffix("-ss0")
    family = method_family(config)
    if family == "pb-llm" and config.get("scale_search", 0) <= 1:
        recipe, family = recipe + OLD_PBLLM, family + OLD_PBLLM  # before the α search became the default
    elif family == "pb-llm" and not config.get("order_search", False):
        recipe, family = recipe + NO_ORDER_SEARCH, family + NO_ORDER_SEARCH  # before the order search became the default
    for stage, flag in (("tune", "tune"), ("e2e_steps", "e2e")):  # tuning stages: lines of their own on the plot
        if config.get(stage):
            recipe, family = recipe + f" +{flag}", family + f" +{flag}"
    rotate = config.get("rotate", "none")
    return {"setting": recipe + ("" if rotate == "none" else f" rotate={rotate}"), "family": family,
            "rotate": rotate, "seed": quant["calibration"].get("seed"), "nsamples": quant["calibration"].get("nsamples"),
            "bits_per_weight": quant["bits_per_weight"], "ppl": eval_ppl(evaluated, windows), "windows": windows,
            "tool": "llmbin", "machine": machine, "source": source}


def collect_runs(folder: Path, machine: str, windows: int | None = None) -> list[dict]:
    rows = []
    for quant_file in sorted(folder.glob("*.quant.json")):
        name, quant = quant_file.name.removesuffix(".quant.json"), json.loads(quant_file.read_text())
        for eval_name in (f"{name}.full.json", f"{name}.eval.json", f"{name}.{windows}.json"):
            if (folder / eval_name).exists():
                evaluated = json.loads((folder / eval_name).read_text())
                if eval_ppl(evaluated, windows) is None:
                    continue  # a quick look, not this protocol's windows
                rows.append(llmbin_row(quant, evaluated, str(folder / name), machine, windows))
                break
        for pass_file in sorted(folder.glob(f"{name}.e2e-*.json")):  # eval/kl_pass.py on this checkpoint
            tuned = json.loads(pass_file.read_text())
            passed = {**quant, "config": {**quant["config"], "e2e_steps": tuned["steps"], "e2e_lr": tuned["lr"]}}
            evaluated = {"ppl": {"wikitext2": tuned["ppl"]}, "max_windows": tuned.get("windows")}
            if eval_ppl(evaluated, windows) is not None:
                rows.append(llmbin_row(passed, evaluated, str(pass_file), machine, windows))
    return rows


def collect_gguf(spec: str, machine: str, windows: int | None = None) -> dict:
    path, eval_json = spec.split("=", 1)
    counted, evaluated = gguf_linear_bits(path), json.loads(Path(eval_json).read_text())
    ppl = eval_ppl(evaluated, windows)
    if ppl is None:
        raise SystemExit(f"{eval_json} does not cover {'the whole test' if windows is None else f'{windows} windows'}")
    name = Path(path).stem.split("-")[-1]
    types = ", ".join(f"{k} {v:.1%}" for k, v in sorted(counted["weight_share_by_type"].items(), key=lambda kv: -kv[1]))
    return {"setting": f"llama.cpp {name} + imatrix", "family": "llama.cpp", "rotate": "none", "seed": None,
            "nsamples": None, "bits_per_weight": counted["bits_per_weight"], "ppl": ppl, "windows": windows,
            "tool": "llama.cpp", "machine": machine, "source": path, "types": types}


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per setting and machine: seed-0 (or first) figures plus the median and range over seeds."""
    settings: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        settings.setdefault((r["setting"], r["machine"]), []).append(r)
    out = []
    for members in settings.values():
        members.sort(key=lambda r: (r["seed"] is None, r["seed"] or 0))
        ppls = [r["ppl"] for r in members]
        out.append({**members[0], "seeds": [r["seed"] for r in members], "ppl_median": statistics.median(ppls),
                    "ppl_min": min(ppls), "ppl_max": max(ppls)})
    out.sort(key=lambda r: r["bits_per_weight"])
    for r in out:
        r["pareto"] = not any(o is not r and o["bits_per_weight"] <= r["bits_per_weight"] and o["ppl_median"] < r["ppl_median"]
                              for o in out)
    return out


def table(summary: list[dict], machine_names: dict[str, str]) -> str:
    lines = ["| setting | true bits/weight | wikitext-2 ppl | seeds (median, range) | machine | front |",
             "|---|---|---|---|---|---|"]
    for r in summary:
        spread = "-" if len(r["seeds"]) < 2 else (f"{r['ppl_median']:.2f} ({r['ppl_min']:.2f}–{r['ppl_max']:.2f}), "
                                                   f"seeds {', '.join(map(str, r['seeds']))}")
        name = r["setting"] + (f" ({r['types']})" if r.get("types") else "")
        lines.append(f"| {name} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {spread} | "
                     f"{machine_names[r['machine']]} | {'★' if r['pareto'] else ''} |")
    lines.append("")
    lines += [f"{label}: {machine}" for machine, label in machine_names.items()]
    return "\n".join(lines) + "\n"


SMOLLM2_TITLE = "SmolLM2-135M, calibration 32 x 2048 (wikitext-2 validation), full wikitext-2 test"


def plot(path: Path, summary: list[dict], float_ppl: float | None, machine_names: dict[str, str], main: str,
         ceiling: float = 3000.0, title: str = SMOLLM2_TITLE) -> None:
    """Circles without rotation, squares with; a line joins a method's settings run on one machine.
    Legend entries name the machine unless it is ``main``. Rows above ``ceiling`` are listed, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines: dict[tuple[str, str, str], list[dict]] = {}
    for r in summary:
        if r["ppl_median"] <= ceiling:
            lines.setdefault((r["family"], r["rotate"], r["machine"]), []).append(r)
    for (family, rotate, machine), members in sorted(lines.items()):
        members.sort(key=lambda r: r["bits_per_weight"])
        xs, ys = [r["bits_per_weight"] for r in members], [r["ppl_median"] for r in members]
        where = "" if machine == main else f" ({machine_names[machine]})"
        if family == "llama.cpp":
            ax.plot(xs, ys, "kX", markersize=8, label="llama.cpp IQ/K types + imatrix" + where)
        else:
            color = colors.setdefault(family, palette[len(colors) % len(palette)])
            ax.plot(xs, ys, color=color, marker={"none": "o", "input": "^"}.get(rotate, "s"),
                    linestyle=("-" if rotate == "none" else "--") if len(members) > 1 else "none",
                    label=family + ("" if rotate == "none" else f", rotate={rotate}") + where)
            for r in members:
                if len(r["seeds"]) > 1:
                    ax.vlines(r["bits_per_weight"], r["ppl_min"], r["ppl_max"], color=color, linewidth=2)
        for r in members:
            ax.annotate(r["setting"].replace(" rotate=", " ↻").replace("llama.cpp ", "").replace(" + imatrix", ""),
                        (r["bits_per_weight"], r["ppl_median"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if float_ppl:
        ax.axhline(float_ppl, color="gray", linestyle=":", label=f"float ({float_ppl:.2f})")
    off = [f"{r['setting']} {r['ppl_median']:.0f}" for r in summary if r["ppl_median"] > ceiling]
    if off:
        ax.text(0.01, 0.99, "off the chart: " + ", ".join(off), transform=ax.transAxes, fontsize=6, va="top")
    ax.set_xlabel("true bits per weight over the block linears (every scale, mask, index and seed counted)")
    ax.set_ylabel("wikitext-2 perplexity (log); bars: range over calibration seeds")
    ax.set_yscale("log")
    ax.set_title(f"{title}; machine {machine_names[main]} unless named", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="folders with NAME.quant.json + NAME.full.json pairs")
    p.add_argument("--gguf", nargs="*", default=[], help="FILE.gguf=EVAL.json")
    p.add_argument("--record", default="docs/pareto-smollm2.json", help="rows so far; updated in place")
    p.add_argument("--table", help="markdown table (default: the record's name with .md)")
    p.add_argument("--plot", help="PNG of perplexity against true bits")
    p.add_argument("--note", help="appended to this machine's name for the rows collected now, e.g. '1 thread'")
    p.add_argument("--float-ppl", type=float, default=21.61, help="the float model's perplexity (a reference line)")
    p.add_argument("--windows", type=int, help="every row is the perplexity of the first N test windows "
                   "(default: the whole test split)")
    p.add_argument("--title", default=SMOLLM2_TITLE, help="the plot's title: model and protocol")
    args = p.parse_args()

    record = Path(args.record)
    rows = json.loads(record.read_text())["rows"] if record.exists() else []
    machine = this_machine() + (f", {args.note}" if args.note else "")
    new = [row for folder in args.runs for row in collect_runs(Path(folder), machine, args.windows)]
    new += [collect_gguf(spec, machine, args.windows) for spec in args.gguf]
    keys = {(r["setting"], r["seed"], r["machine"]) for r in new}
    rows = [r for r in rows if (r["setting"], r["seed"], r["machine"]) not in keys] + new
    rows.sort(key=lambda r: (r["bits_per_weight"], r["setting"], r["seed"] or 0))
    machines = sorted({r["machine"] for r in rows})
    machine_names = {m: f"M{i + 1}" for i, m in enumerate(machines)}
    summary = summarize(rows)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"float_ppl": args.float_ppl, "rows": rows, "summary": summary}, indent=1) + "\n")
    text = table(summary, machine_names)
    Path(args.table or record.with_suffix(".md")).write_text(text)
    print(text, end="")
    if args.plot:
        main_machine = max(machines, key=lambda m: sum(r["machine"] == m for r in summary))
        plot(Path(args.plot), summary, args.float_ppl, machine_names, main_machine, title=args.title)


if __name__ == "__main__":
    main()
