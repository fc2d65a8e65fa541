"""Does PB-LLM's scale search fit the calibration text or the layer? Layer error on held-out text.

For each named linear of the float model, two Hessians of its inputs are taken: one from the
documented calibration windows (``--nsamples`` × ``--seqlen`` of ``wikitext-2-v1/validation``,
``--seed``) and one from ``--test-windows`` windows of the wikitext-2 test text. The layer is
quantized with PB-LLM on the calibration Hessian, with one GPTQ pass and with the scale search,
(both left to right: ``order_search`` off, so the search is measured alone), and its Hessian-weighted error (``metrics.hessian_weighted_error``), relative to ``tr(W H Wᵀ)``,
is reported under both Hessians.

    python eval/heldout_layer_error.py --salient-frac 0.1 --seed 1 --inputs-from runs/r17/pb10-ss6-s1 \\
        --layer model.layers.7.self_attn.v_proj --layer model.layers.7.self_attn.q_proj [--json FILE]

``--inputs-from CKPT`` takes the inputs through a packed checkpoint of the same model (what the
sequential driver sees once the blocks before are quantized) instead of through the float model.
"""
from __future__ import annotations

import argparse
import json

import torch

from llmbin.algorithms.hessian import accumulate_hessian
from llmbin.algorithms.layer import quantize_layer
from llmbin.algorithms.metrics import hessian_weighted_error
from llmbin.algorithms.pbllm import pbllm_quantize
from llmbin.checkpoint.io import load
from llmbin.config import PBLLMConfig, make_config
from llmbin.data.calibration import calibration_windows
from llmbin.data.paths import local_file
from llmbin.models import load_model


@torch.no_grad()
def input_hessians(model, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``2 XᵀX / tokens`` of each named linear's inputs over ``windows``, as the driver accumulates it."""
    state = {n: (torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features,
                             dtype=torch.float64), 0) for n in names}

    def hook(name):
        def record(module, args, output):
            state[name] = accumulate_hessian(*state[name], args[0])
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for window in windows:
            model(window[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: H.float() for n, (H, _) in state.items()}


def add_layer_arguments(p: argparse.ArgumentParser, salient_frac: float) -> None:
    """The options every layer-error probe here shares: which layers, which PB-LLM fraction, and
    the calibration and held-out windows."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", action="append", required=True)
    p.add_argument("--salient-frac", type=float, default=salient_frac)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")


def window_sets(tokenizer, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The documented calibration windows and ``--test-windows`` held-out windows of the test text."""
    return {"calibration": calibration_windows(tokenizer, str(local_file("wikitext2", "calibration")),
                                               args.nsamples, args.seqlen, args.seed),
            "held out": calibration_windows(tokenizer, str(local_file("wikitext2", "test")), args.test_windows, args.seqlen, 0)}


def relative_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    return hessian_weighted_error(W, Q, H) / hessian_weighted_error(W, torch.zeros_like(W), H)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(p, salient_frac=0.1)
    p.add_argument("--inputs-from", help="packed checkpoint whose blocks produce the layers' inputs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    weights = {n: model.get_submodule(n).weight.detach().float().clone() for n in args.layer}
    source = load(args.inputs_from) if args.inputs_from else model
    sets = window_sets(tokenizer, args)
    hessians = {key: input_hessians(source, args.layer, windows) for key, windows in sets.items()}
    rows = []
    for name in args.layer:
        W, H = weights[name], hessians["calibration"][name]
        for passes in (0, PBLLMConfig.scale_search):
            config = make_config("pb-llm", salient_frac=args.salient_frac, scale_search=passes, order_search=False)
            Q = quantize_layer(pbllm_quantize, W, H, config).dense()  # with the scale refit stage
            rows.append({"layer": name, "scale_search": passes,
                         **{key: relative_error(W, Q, hessians[key][name]) for key in sets}})
    print(f"PB-LLM {args.salient_frac:.0%}, inputs through {args.inputs_from or args.model}, calibration seed {args.seed}")
    print("| layer | scale_search | calibration error | held-out error |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['scale_search']} | {r['calibration']:.5f} | {r['held out']:.5f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
