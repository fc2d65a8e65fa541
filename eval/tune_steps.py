"""How far does block-wise tuning get with more steps? Block output error before and after tuning.

Runs ``llmbin quantize``'s driver on the first ``--blocks`` blocks of ``--model`` with ``--tune`` and
each ``--steps`` setting in turn (the README protocol's calibration: ``--nsamples`` × ``--seqlen`` of
``wikitext-2-v1/validation``, ``--seed``), and reports, per block, the mean output error relative to
the float block's output (``block_tuning.block_error`` over the calibration windows) just before
and just after the stage. Each block is fed the quantized and tuned blocks before it, as in a run,
so later blocks also show what the earlier blocks' tuning carried forward. The stage is the
library's own ``tune_block``; only the step count and step size change.

    python eval/tune_steps.py --recipe db-llm-fdb --rotate input --blocks 4 --steps 32,96 --json FILE
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from llmbin import driver
from llmbin.block_tuning import block_error, tune_block
from llmbin.errors import QuantizationStopped
from llmbin.data.calibration import calibration_windows
from llmbin.models import open_model
from llmbin.quantize import quantize
from llmbin.recipes import recipe_config


def measured_tuning(rows: list) -> callable:
    """``tune_block`` as the driver calls it, with the block's error before and after appended to ``rows``."""
    def tune(block, inputs, targets, kwargs, *, device, **options):
        before = block_error(block, inputs, targets, kwargs, device=device)
        report = tune_block(block, inputs, targets, kwargs, device=device, **options)
        rows.append({"block": len(rows), "before": before, "after": block_error(block, inputs, targets, kwargs,
                                                                                 device=device),
                     "tune_seconds": report["seconds"]})
        print(rows[-1], flush=True)
        return report
    return tune


def run(args, steps: int) -> list:
    rows = []
    driver.tune_block = measured_tuning(rows)
    opened = open_model(args.model)
    calibration = calibration_windows(opened.tokenizer, args.calib_data, args.nsamples, args.seqlen, args.seed)
    config = recipe_config(args.recipe, tune=True, tune_steps=steps, tune_lr=args.lr,
                           **({"rotate": args.rotate} if args.rotate else {}))
    with tempfile.TemporaryDirectory() as work:
        try:
            quantize(opened.model, config, calibration, progress=False, work_dir=work, weights=opened.weights,
                     stop_after_blocks=args.blocks, stats={})
        except QuantizationStopped:
            pass
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="db-llm-fdb")
    p.add_argument("--rotate", help="the recipe's --rotate, if another")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--steps", default="32,96", help="comma-separated --tune-steps settings")
    p.add_argument("--lr", type=float, default=1e-2, help="--tune-lr")
    p.add_argument("--calib-data", default="wikitext2")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    result = {"model": args.model, "recipe": args.recipe, "rotate": args.rotate, "lr": args.lr,
              "calibration": [args.nsamples, args.seqlen, args.seed], "runs": {}}
    for steps in [int(s) for s in args.steps.split(",")]:
        start = time.perf_counter()
        result["runs"][steps] = {"blocks": run(args, steps), "seconds": time.perf_counter() - start}
    runs = result["runs"]
    print("| block | " + " | ".join(f"{s} steps: before -> after" for s in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for i in range(max(len(r["blocks"]) for r in runs.values())):
        cells = [f"{r['blocks'][i]['before']:.5f} -> {r['blocks'][i]['after']:.5f}" if i < len(r["blocks"]) else "-"
                 for r in runs.values()]
        print(f"| {i} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
