"""Probe (issue 32, item 4): does an end-to-end pass against the float model's logits beat the
block-wise stage? Loads a packed checkpoint, tunes the same tensors the block-wise stage tunes
(``block_tuning.tuned_tensors`` of every block, and the final norm) to minimise
``KL(float ‖ quantized)`` of the next-token distributions on the calibration windows the
checkpoint recorded, then evaluates perplexity in memory.

The float model's side costs one pass: its final hidden states (after the last norm) are kept per
window, 4 × seqlen × hidden bytes each, and its logits are recomputed from them in token chunks,
so no window's full logits tensor is stored. The quantized model runs with gradient checkpointing
per block.

    LLMBIN_DATA=../shared/data python eval/kl_pass.py CKPT --model smollm2-135m --steps 64 --lr 1e-3 \\
        [--windows N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from llmbin.block_tuning import _freeze, _make_leaves
from llmbin.checkpoint.io import load, load_tokenizer
from llmbin.data.calibration import calibration_windows
from llmbin.data.text import resolve_text
from llmbin.evaluate.perplexity import perplexity
from llmbin.models import decoder_layers, load_model
from llmbin.nn.binary_linear import BinaryLinear

CHUNK = 256  # tokens per piece of the vocabulary-wide loss


def kl_backward(hidden: torch.Tensor, teacher: torch.Tensor, head_s, head_t: torch.Tensor) -> float:
    """Mean per-token ``KL(softmax(head_t·teacher) ‖ softmax(head_s(hidden)))``; backward through
    ``hidden`` one token chunk at a time. Returns the loss."""
    leaf = hidden.detach().requires_grad_(True)
    total = 0.0
    n = hidden.shape[0]
    for start in range(0, n, CHUNK):
        t_logp = F.log_softmax(F.linear(teacher[start:start + CHUNK], head_t), dim=-1)
        s_logp = F.log_softmax(head_s(leaf[start:start + CHUNK]).float(), dim=-1)
        loss = (t_logp.exp() * (t_logp - s_logp)).sum() / n
        loss.backward()
        total += float(loss.detach())
    hidden.backward(leaf.grad)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="relative to each tensor's mean magnitude")
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
    head_t = teacher.get_output_embeddings().weight.detach().float()
    start = time.perf_counter()
    with torch.no_grad():
        targets = [teacher.model(ids.unsqueeze(0), use_cache=False).last_hidden_state[0] for ids in windows]
    del teacher
    print(f"float targets: {time.perf_counter() - start:.0f} s", flush=True)

    leaves = {}
    for index, block in enumerate(decoder_layers(student)):
        leaves.update({(index, k): v for k, v in _make_leaves(block).items()})
    final_norm = student.model.norm
    leaves.update({("norm", k): v for k, v in _make_leaves(final_norm).items()})
    groups = [{"params": [leaf], "lr": args.lr * float(leaf.detach().abs().mean().clamp_min(1e-8))}
              for leaf, _ in leaves.values()]
    optimizer = torch.optim.Adam(groups)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    head_s = student.get_output_embeddings()
    order = torch.cat([torch.randperm(len(windows), generator=torch.Generator().manual_seed(e))
                       for e in range(-(-args.steps // len(windows)))]).tolist()
    losses, start = [], time.perf_counter()
    with torch.enable_grad():
        for step in range(args.steps):
            i = order[step]
            hidden = student.model(windows[i].unsqueeze(0), use_cache=False).last_hidden_state[0]
            losses.append(kl_backward(hidden, targets[i], head_s, head_t))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            print(f"step {step} window {i} kl {losses[-1]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    student.gradient_checkpointing_disable()
    student.eval()
    for index, block in enumerate(decoder_layers(student)):
        _freeze(block, {k: v for (i, k), v in leaves.items() if i == index})
    _freeze(final_norm, {k: v for (i, k), v in leaves.items() if i == "norm"})
    for module in student.modules():
        if isinstance(module, BinaryLinear):
            module.dense_cache = True  # as `llmbin eval --dense-cache`: the packed kernel is for decoding
    ids = tokenizer(resolve_text("wikitext2", "test"), return_tensors="pt").input_ids[0]
    ppl = perplexity(student, ids, seqlen=2048, max_windows=args.windows, progress=False)
    span = len(windows)
    result = {"checkpoint": args.checkpoint, "steps": args.steps, "lr": args.lr, "seconds": seconds,
              "kl_first": sum(losses[:span]) / len(losses[:span]), "kl_last": sum(losses[-span:]) / len(losses[-span:]),
              "windows": args.windows, "ppl": ppl}
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
