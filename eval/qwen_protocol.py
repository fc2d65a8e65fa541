"""Qwen2.5-Coder-1.5B against llama.cpp: every run of the protocol, resumable across sessions.

The protocol (docs/results/qwen.md):

* the float model is the GGUF file's weights dequantized (``python3 ../shared/models/fetch_model.py
  qwen2.5-coder-1.5b`` prints its path);
* calibration: wikitext-2-v1 validation, 32 x 2048 windows, seed 0 (``--seeds`` for more);
* evaluation: raw wikitext-2 test, 2048-token windows, the first 40 (``--windows``; 0 for the whole
  test), each window's NLL logged so that an interrupted evaluation resumes (``llmbin eval --cache``).

Each argument names one run:

* ``float``: the float model;
* ``gguf:TYPE``: llama.cpp's TYPE file, made by ``eval/llamacpp_peer.py quantize --dir LLAMACPP``;
* ``RECIPE[@rotate=input|both][@KEY=VALUE...]``: ``llmbin quantize --recipe RECIPE`` with those
  options (``--salient-frac 0.05`` is ``@salient_frac=0.05``, ``--tune`` is ``@tune=true``), then
  ``llmbin eval`` of the checkpoint.

A finished step is skipped; an interrupted quantization resumes from its last finished block.
Outputs in ``--out``: ``NAME.quant.json`` and ``NAME.WINDOWS.json`` (``eval/pareto.py --windows``
reads them), the checkpoint ``NAME/`` and the window logs.

    python eval/qwen_protocol.py --out runs/qwen float gguf:IQ2_XXS db-llm-fdb-rotated pb-llm-10@rotate=input
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from llamacpp_peer import type_file

CALIBRATION = "wikitext/wikitext-2-v1/validation-00000-of-00001.parquet"


def model_path() -> str:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "shared/models/fetch_model.py"),
                          "qwen2.5-coder-1.5b"], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def llmbin(*args: str) -> None:
    cmd = [sys.executable, "-m", "llmbin.cli", *args, "--no-progress"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_name(spec: str, seed: int) -> str:
    return spec.replace(":", "-").replace("@", "+").replace("=", "") + (f"-seed{seed}" if seed else "")


def quantize(spec: str, model: str, out: Path, seed: int, data: Path) -> None:
    recipe, *options = spec.split("@")
    args = ["quantize", "--model", model, "--recipe", recipe, "--calib-data", str(data / CALIBRATION),
            "--nsamples", "32", "--seqlen", "2048", "--seed", str(seed), "--out", str(out),
            "--json", str(out) + ".quant.json"]
    for option in options:
        key, value = option.split("=", 1)
        flag = key.replace("_", "-")
        if value in ("true", "false"):  # a switch: @tune=true is --tune, @order_search=false --no-order-search
            args.append(f"--{flag}" if value == "true" else f"--no-{flag}")
        else:
            args += [f"--{flag}", value]
    llmbin(*args)


def evaluate(target: list[str], out: Path, windows: int) -> None:
    limit = ["--max-windows", str(windows)] if windows else []
    llmbin("eval", *target, *limit, "--cache", str(out), "--json", f"{out}.{windows or 'full'}.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="float, gguf:TYPE or RECIPE[@KEY=VALUE...]")
    p.add_argument("--out", type=Path, default=Path("runs/qwen"), help="where the runs go")
    p.add_argument("--windows", type=int, default=40, help="test windows to evaluate (0: the whole test)")
    p.add_argument("--seeds", default="0", help="calibration seeds, comma-separated, for llmbin runs")
    p.add_argument("--llamacpp", type=Path, default=Path("llamacpp"), help="eval/llamacpp_peer.py's --dir")
    p.add_argument("--model", help="the GGUF file (default: fetch_model.py's path)")
    args = p.parse_args()
    data = Path(os.environ.get("LLMBIN_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    os.environ["LLMBIN_DATA"] = str(data)
    model = args.model or model_path()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        seeds = [0] if spec == "float" or spec.startswith("gguf:") else [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            out = args.out / run_name(spec, seed)
            if Path(f"{out}.{args.windows or 'full'}.json").exists():
                print(f"{out.name}: done")
                continue
            if spec == "float":
                evaluate(["--model", model], out, args.windows)
            elif spec.startswith("gguf:"):
                evaluate(["--model", str(type_file(args.llamacpp, model, spec[5:]))], out, args.windows)
            else:
                if not Path(f"{out}.quant.json").exists():
                    quantize(spec, model, out, seed, data)
                evaluate([str(out), "--dense-cache"], out, args.windows)  # same numbers, faster at 2048 tokens


if __name__ == "__main__":
    main()
