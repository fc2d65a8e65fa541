"""Which layers make one checkpoint worse than another? Swap them in and measure.

Loads two packed checkpoints of the same model, BASE and DONOR, and evaluates BASE with parts of
DONOR put in its place: a range of decoder blocks (``6-8`` = blocks 6 and 7) or named linears
inside the blocks (``7.self_attn.v_proj``; join several with ``+``). Each probe is a wikitext-2
perplexity over the first ``--windows`` test windows, so the numbers compare probes with each
other, not with full-test figures.

    python eval/swap_blocks.py runs/r17/pb10-ss6-s1 runs/r17/pb10-ss0-s1 --windows 6 \\
        --swap 0-8 --swap 6-7 --swap 7.self_attn.v_proj [--alpha-scale 0.97] [--json FILE]

``--alpha-scale G`` adds probes of BASE with every binarized row scale ``alpha`` multiplied by G:
whether perplexity is smooth in the scales or only in the discrete choices (signs, masks).

Blocks are quantized in sequence on the outputs of the blocks before them, so a swapped part
meets inputs it was not fitted on; a large recovery still points at where the two differ most.
"""
from __future__ import annotations

import argparse
import json

import torch

from llmbin.checkpoint.io import load, load_tokenizer
from llmbin.data.text import resolve_text
from llmbin.evaluate.perplexity import perplexity
from llmbin.nn.binary_linear import BinaryLinear


def load_dense(path: str) -> torch.nn.Module:
    """A checkpoint with each packed layer's dense weights cached, as ``llmbin eval --dense-cache``."""
    model = load(path)
    for module in model.modules():
        if isinstance(module, BinaryLinear):
            module.dense_cache = True
    return model


def swapped(base, donor, spec: str) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Put DONOR's parts named by ``spec`` into BASE; returns what to put back."""
    base_blocks, donor_blocks = base.model.layers, donor.model.layers
    if "-" in spec and "." not in spec:
        lo, hi = (int(v) for v in spec.split("-"))
        names = [str(i) for i in range(lo, hi)]
    else:
        names = spec.split("+")
    undo = []
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = base_blocks.get_submodule(parent) if parent else base_blocks
        source = donor_blocks.get_submodule(parent) if parent else donor_blocks
        undo.append((holder, attr, holder.get_submodule(attr)))
        put(holder, attr, source.get_submodule(attr))
    return undo


def put(holder: torch.nn.Module, attr: str, module: torch.nn.Module) -> None:
    if isinstance(holder, torch.nn.ModuleList):
        holder[int(attr)] = module
    else:
        setattr(holder, attr, module)


def restore(undo) -> None:
    for holder, attr, module in reversed(undo):
        put(holder, attr, module)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("donor")
    p.add_argument("--swap", action="append", default=[], help="blocks LO-HI or block.module names joined by +")
    p.add_argument("--alpha-scale", type=float, action="append", default=[])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base, donor = load_dense(args.base), load_dense(args.donor)
    ids = load_tokenizer(args.base)(resolve_text("wikitext2", "test"), return_tensors="pt").input_ids[0]

    def ppl(model) -> float:
        return perplexity(model, ids, args.seqlen, args.windows, progress=False)

    rows = [{"probe": "base", "ppl": ppl(base)}, {"probe": "donor", "ppl": ppl(donor)}]
    for spec in args.swap:
        undo = swapped(base, donor, spec)
        rows.append({"probe": f"base with donor's {spec}", "ppl": ppl(base)})
        restore(undo)
    for gamma in args.alpha_scale:
        scaled = load_dense(args.base)  # the dense weights are decoded on first use, after the scaling
        for module in scaled.modules():
            if isinstance(module, BinaryLinear):
                module.alpha.mul_(gamma)
        rows.append({"probe": f"base, every alpha x {gamma}", "ppl": ppl(scaled)})
    print(f"base {args.base}, donor {args.donor}, first {args.windows} test windows of {args.seqlen}")
    print("| probe | wikitext-2 ppl |\n|---|---|")
    for r in rows:
        print(f"| {r['probe']} | {r['ppl']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "donor": args.donor, "windows": args.windows, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
