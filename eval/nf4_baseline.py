"""bitsandbytes NF4 baseline for the method benchmark: the ecosystem's 4-bit reference point.

Every linear layer in the decoder blocks becomes a ``bnb.nn.Linear4bit`` (NF4, blocks of 64,
double-quantized absmax: bitsandbytes' QLoRA defaults) and runs through bitsandbytes' own CPU
path. Bits per weight count every tensor bitsandbytes stores for those layers (codes, absmax,
nested statistics, code books). NF4 is round-to-nearest, so the ``--eval`` phase re-quantizes
the float model (identical result) rather than reloading a bitsandbytes checkpoint.

    python eval/nf4_baseline.py --model smollm2-135m --out runs/methods/nf4 --json q.json
    python eval/nf4_baseline.py --model smollm2-135m --eval --json e.json
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch


def to_nf4(model: torch.nn.Module) -> tuple[int, int]:
    """Replace the decoder blocks' linear layers in place; returns (weights, stored bits)."""
    import bitsandbytes as bnb

    from llmbin.models import decoder_layers, linear_layers
    from llmbin.nn.tree import set_submodule

    weights = bits = 0
    for block in decoder_layers(model):
        for name, linear in linear_layers(block).items():
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
            layer = layer.to("cpu")  # quantizes
            set_submodule(block, name, layer)
            weights += linear.weight.numel()
            bits += sum(v.numel() * v.element_size() * 8 for k, v in layer.state_dict().items()
                        if torch.is_tensor(v) and k != "bias")
    return weights, bits


def main() -> None:
    from llmbin.bits import directory_bytes
    from llmbin.evaluate.perplexity import dataset_perplexity
    from llmbin.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", help="write the quantized state dict (safetensors) here, to measure its size")
    p.add_argument("--eval", action="store_true", help="evaluate wikitext-2 perplexity")
    p.add_argument("--max-windows", type=int)
    p.add_argument("--json", required=True)
    args = p.parse_args()

    model, tokenizer = load_model(args.model)
    fp16_bytes = 2 * sum(t.numel() for t in {id(t): t for t in model.state_dict().values()}.values())
    start = time.perf_counter()
    weights, bits = to_nf4(model)
    report = {"model": args.model, "config": {"method": "bnb-nf4", "blocksize": 64, "double_quant": True},
              "bits_per_weight": bits / weights, "quantize_seconds": time.perf_counter() - start,
              "fp16_bytes": fp16_bytes}
    if args.out:
        from safetensors.torch import save_file

        out, tmp = Path(args.out), Path(args.out + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            if torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                state[k] = v.half().contiguous() if v.is_floating_point() and v.dim() > 1 else v.contiguous()
        save_file(state, str(tmp / "model.safetensors"))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        report["disk_bytes"] = directory_bytes(out)
    if args.eval:
        start = time.perf_counter()
        ppl = dataset_perplexity(model, tokenizer, "wikitext2", max_windows=args.max_windows)
        report.update(ppl={"wikitext2": ppl}, eval_seconds=time.perf_counter() - start, max_windows=args.max_windows)
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
