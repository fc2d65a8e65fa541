"""Probe (issue 32, item 4): does an end-to-end pass against the float model's logits beat the
block-wise stage? Loads a packed checkpoint, tunes the same tensors the block-wise stage tunes
(``block_tuning.tuned_tensors`` of every block, and the final norm) to minimise
``KL(float ‖ quantized)`` of the next-token distributions on the calibration windows the
checkpoint recorded, then evaluates perplexity in memory.

The float model's side costs one pass: its final hidden states (after the last norm) are kept per
window, 4 × seqlen × hidden bytes each, and its logits are recomputed from them in token chunks,
so no window's full logits tensor is stored. The quantized model runs with gradient checkpointing
per block.

    LLMBIN_DATA=../shared/data python eval/kl_pass.py CKPT --model smollm2-135m --steps 64 --lr 3e-3 \\
        [--windows N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from llmbin.checkpoint.io import load, load_tokenizer
from llmbin.config import QuantConfig
from llmbin.data.calibration import calibration_windows
from llmbin.data.text import resolve_text
from llmbin.e2e_tuning import float_final_states, tune_end_to_end
from llmbin.evaluate.perplexity import perplexity
from llmbin.models import load_model
from llmbin.nn.binary_linear import BinaryLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--lr", type=float, default=QuantConfig.e2e_lr, help="relative to each tensor's mean magnitude "
                   "(default: --e2e-lr's)")
    p.add_argument("--windows", type=int, default=None, help="first wikitext-2 test windows (default all)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)

    student = load(args.checkpoint)
    with open(f"{args.checkpoint}/config.json") as f:
        calib = json.load(f)["quantization_config"]["calibration"]
    tokenizer = load_tokenizer(args.checkpoint)
    windows = calibration_windows(tokenizer, calib.get("data", "wikitext2"), calib["nsamples"], calib["seqlen"],
                                  calib.get("seed", 0))
    teacher, _ = load_model(args.model)
    start = time.perf_counter()
    targets = float_final_states(teacher, windows, "cpu")
    del teacher
    print(f"float targets: {time.perf_counter() - start:.0f} s", flush=True)
    report = tune_end_to_end(student, windows, targets, steps=args.steps, lr=args.lr, device="cpu")
    for module in student.modules():
        if isinstance(module, BinaryLinear):
            module.dense_cache = True  # as `llmbin eval --dense-cache`: the packed kernel is for decoding
    ids = tokenizer(resolve_text("wikitext2", "test"), return_tensors="pt").input_ids[0]
    ppl = perplexity(student, ids, seqlen=2048, max_windows=args.windows, progress=False)
    result = {"checkpoint": args.checkpoint, "steps": args.steps, "lr": args.lr, "seconds": report["e2e_seconds"],
              "kl_first": report["e2e_kl_first"], "kl_last": report["e2e_kl_last"], "windows": args.windows, "ppl": ppl}
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
