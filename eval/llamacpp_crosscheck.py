"""llama.cpp's own ``llama-perplexity`` against llmbin's protocol, on the same windows of the same file.

The two tools score a window differently. llmbin (the papers' protocol) averages the NLL of every
next-token prediction in each 2048-token window; ``llama-perplexity`` averages only those in the
second half (it predicts tokens ``n_ctx/2 + 1 .. n_ctx - 1`` of each chunk, so every scored token
has at least 1024 tokens of context). So this script runs the GGUF file through llmbin's loader
(transformers, dequantized with the ``gguf`` package) on the first ``--windows`` windows of the
wikitext-2 raw test text, and reports both scores: llmbin's, and llama.cpp's scoring rule applied
to llmbin's logits. The second must equal ``llama-perplexity -c 2048 --chunks N`` on the same text
(written here with the same joining) up to float arithmetic; the first is what the results report.

    python eval/llamacpp_crosscheck.py FILE.gguf --llamacpp /work/llamacpp --windows 8 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F


def llmbin_scores(model_path: str, text: str, windows: int, seqlen: int) -> dict:
    from llmbin.models import load_model

    model, tokenizer = load_model(model_path)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    whole, half = [], []
    first = seqlen // 2
    with torch.no_grad():
        for i in range(windows):
            window = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            logits = model(window, use_cache=False).logits[0].float()
            nll = F.cross_entropy(logits[:-1], window[0, 1:], reduction="none")
            whole.append(nll.mean().item())
            half.append(nll[first:].mean().item())  # logits at first..seqlen-2 predict tokens first+1..seqlen-1
            print(f"window {i}: all {math.exp(whole[-1]):.4f}, second half {math.exp(half[-1]):.4f}", flush=True)
    return {"tokens": int(ids.numel()), "ppl": math.exp(sum(whole) / windows),
            "ppl_second_half": math.exp(sum(half) / windows), "window_nll": whole, "window_nll_second_half": half}


def llamacpp_score(binary: Path, model_path: str, text_file: Path, windows: int, seqlen: int, threads: int) -> dict:
    out = subprocess.run([str(binary), "-m", model_path, "-f", str(text_file), "-c", str(seqlen), "-b", str(seqlen),
                          "--chunks", str(windows), "-t", str(threads)], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    running = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+)", log)]
    return {"ppl_second_half": float(final.group(1)), "stderr": float(final.group(2)), "running": running,
            "log_tail": log[-2000:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf")
    p.add_argument("--llamacpp", type=Path, required=True, help="the folder eval/llamacpp_peer.py build filled")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    from llmbin.data.text import resolve_text

    text = resolve_text("wikitext2", "test")
    text_file = args.llamacpp / "wikitext2-raw-test.txt"
    text_file.write_text(text)
    ours = llmbin_scores(args.gguf, text, args.windows, args.seqlen)
    theirs = llamacpp_score(args.llamacpp / "build" / "bin" / "llama-perplexity", args.gguf, text_file, args.windows,
                            args.seqlen, args.threads)
    rel = theirs["ppl_second_half"] / ours["ppl_second_half"] - 1
    print(f"{Path(args.gguf).name}, {args.windows} windows of {args.seqlen}:")
    print(f"  llmbin protocol (every token): {ours['ppl']:.4f}")
    print(f"  second half of each window: llmbin {ours['ppl_second_half']:.4f}, llama-perplexity "
          f"{theirs['ppl_second_half']:.4f} ± {theirs['stderr']:.4f} ({rel:+.3%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"file": args.gguf, "windows": args.windows, "seqlen": args.seqlen,
                                               "llmbin": ours, "llama_perplexity": theirs,
                                               "relative_difference": rel}, indent=2) + "\n")


if __name__ == "__main__":
    main()
