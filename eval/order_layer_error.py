"""Which column order should PB-LLM's GPTQ take? Layer error left to right and in activation order.

For each named linear of the float model, the inputs' Hessian is taken on the documented calibration
windows (``--nsamples`` × ``--seqlen`` of ``wikitext-2-v1/validation``, ``--seed``) and on
``--test-windows`` windows of the wikitext-2 test text (held out). The layer is quantized with
PB-LLM (the scale search on) left to right, and in GPTQ's activation order (columns by decreasing
``H_jj``, done by hand: permute, quantize, un-permute). Reported, relative to left to right:

* activation order's error, and the order search's: the better of the two per layer by this
  calibration error, after the scale refit stage (``pbllm_quantize`` ranks the orders by the error its
  GPTQ passes leave, before the refit);
* the per-row best of the two, and how far its salient count drifts from the asked fraction:
  the reason the search chooses per layer, not per row.

    python eval/order_layer_error.py --salient-frac 0.5 --layer model.layers.3.self_attn.o_proj [--json FILE]
"""
from __future__ import annotations

import argparse
import json

import torch
from heldout_layer_error import add_layer_arguments, input_hessians, window_sets

from llmbin.algorithms.hessian import act_order, permute_hessian
from llmbin.algorithms.layer import quantize_layer
from llmbin.algorithms.pbllm import pbllm_quantize
from llmbin.config import make_config
from llmbin.models import load_model
from llmbin.packing.positions import decode_positions


def row_errors(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Each row's ``(w − q) H (w − q)ᵀ``: the Hessian-weighted error is their sum."""
    E = (W - Q).double()
    return ((E @ H.double()) * E).sum(dim=1)


def salient_per_row(packed) -> torch.Tensor:
    s = packed.salient
    return torch.bincount(decode_positions(s.encoding, s.positions, packed.shape) // packed.shape[1],
                          minlength=packed.shape[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(p, salient_frac=0.5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    sets = window_sets(tokenizer, args)
    hessians = {key: input_hessians(model, args.layer, windows) for key, windows in sets.items()}
    config = make_config("pb-llm", salient_frac=args.salient_frac, order_search=False)
    rows = []
    for name in args.layer:
        W, H = model.get_submodule(name).weight.detach().float().clone(), hessians["calibration"][name]
        natural = quantize_layer(pbllm_quantize, W, H, config)  # with the scale refit stage, as the driver runs it
        perm = act_order(H)
        by_order = quantize_layer(pbllm_quantize, W[:, perm], permute_hessian(H, perm), config)
        Qs = [natural.decode(), by_order.decode()[:, torch.argsort(perm)]]
        errors = {key: [row_errors(W, Q, hessians[key][name]) for Q in Qs] for key in sets}
        pick = errors["calibration"][1] < errors["calibration"][0]
        searched = 1 if errors["calibration"][1].sum() < errors["calibration"][0].sum() else 0
        counts = [salient_per_row(natural), salient_per_row(by_order)]  # rows are not permuted: per-row counts line up
        row = {"layer": name}
        for key in sets:
            left, act = (e.sum().item() for e in errors[key])
            row[key] = {"activation order": act / left, "order search": (left, act)[searched] / left,
                        "per-row best": torch.where(pick, errors[key][1], errors[key][0]).sum().item() / left}
        row["per-row salient drift"] = torch.where(pick, counts[1], counts[0]).sum().item() / counts[0].sum().item() - 1
        rows.append(row)
    print(f"PB-LLM {args.salient_frac:.0%} with the scale search, error relative to left to right "
          f"(calibration / held out), calibration seed {args.seed}")
    print("| layer | activation order | order search (per layer) | per-row best | per-row salient drift |\n|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r['calibration'][k]:.3f} / {r['held out'][k]:.3f}" for k in ("activation order", "order search", "per-row best")]
        print(f"| {r['layer']} | {' | '.join(cells)} | {r['per-row salient drift']:+.2%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
