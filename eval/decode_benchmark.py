"""Benchmark: decode speed through ``model.generate`` against llama.cpp's ``llama-bench``, one CPU.

Every contender runs batch 1, greedy, a 512-token prompt (the start of the wikitext-2 test text)
and exactly 128 new tokens, on ``--threads`` threads (2 by default), in its own process, one after
another, so that memory figures are each its own and nothing else shares the CPU. Per contender:

* prefill tokens/s (prompt tokens over the time to the first new token) and decode tokens/s (the
  127 tokens after it), the median of ``--repeats`` timed runs after one untimed warm-up run
  (which also compiles, for ``fast`` contenders: its seconds are reported apart);
* peak RSS of the process;
* bytes per token: what a decode step must read at least: every weight as stored (packed planes,
  scales, salient streams, 16-bit tensors) except the input embedding, of which one row is read
  (a tied output matrix counts once), plus the KV cache at the mean decode position;
* the bytes limit, measured copy bandwidth / bytes per token, and decode as a share of it.

Contenders (``--run``, repeatable; all of them by default):

* ``float-fp32``, ``float-bf16``: the original model, eager ``generate``;
* ``float-bf16-fast``: the same with llmbin's fast path (static cache, compiled decode step);
* ``NAME``, ``NAME-fast`` for each ``--checkpoint NAME=DIR``: the packed checkpoint (float parts in
  fp32, 16-bit tensors served as stored), eager and with ``llmbin.prepare_decode``;
* ``layout:SPEC``, ``layout:SPEC-fast`` for each ``--layout SPEC``: ``--model`` with every block
  linear replaced by random codes of a recipe's layout (``eval/layout_speed.py``: ``LAYOUT`` or
  ``LAYOUT+tables8`` for the embedding and output matrix as 8-bit tables, ``--embedding-bits 8``),
  then rounded to storage and served as a loaded checkpoint is. For speed only: its tokens are
  nonsense, and it needs no calibrated checkpoint (a real model's shapes, or a 7B-shaped folder of
  ``eval/random_checkpoint.py``);
* ``gguf:NAME`` for each ``--gguf NAME=FILE``, and ``gguf:TYPE`` for each of ``--gguf-types`` (the
  files ``eval/llamacpp_peer.py quantize`` made of ``--gguf-model``, by default ``--model``, such as the
  7B shape's F16 file of ``eval/random_checkpoint.py --gguf``: block linears in TYPE, embedding and
  output matrix in F16 as llmbin keeps them): ``llama-bench -p 512 -n 128 -t THREADS`` on that file
  (``--llamacpp DIR`` from ``eval/llamacpp_peer.py build``), and ``-p 0 -n 128 -d 512``: its decode
  after a 512-token context, as llmbin's rows decode after the prompt (``-n 128`` alone starts from an
  empty cache).

    python eval/decode_benchmark.py --out-dir runs/decode --model smollm2-135m \\
        --checkpoint pb-llm-10=runs/methods/pb-llm-10 --llamacpp llamacpp --gguf-types Q4_0,Q2_K

Writes ``decode.json`` and ``decode.md`` in ``--out-dir``. Each contender's result is saved as it
finishes (``rows/NAME.json``) and kept, so an interrupted run resumes; ``--fresh`` re-measures. A
saved llmbin row whose kernel sources differ from the checkout's is measured again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS = 512, 128


def kv_bytes(layers: int, kv_width: int, element_bytes: int, position: float) -> float:
    """KV cache bytes read by one decode step at ``position``: keys and values of every layer."""
    return layers * 2 * kv_width * element_bytes * position


def model_bytes_per_token(model) -> tuple[float, float]:
    """(weight bytes a decode step reads, KV bytes per cached position), from the loaded model."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen or tensor.device.type == "meta":
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    if not tied:  # only the token's row of the input table is read
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_width = getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim
    return float(total), kv_bytes(config.num_hidden_layers, kv_width, kv_element_bytes(model), 1.0)


def kv_element_bytes(model) -> int:
    """Bytes per cached key or value element, from the cache a one-token forward fills. Not
    ``model.dtype``: a packed model's first floating tensor is a 16-bit embedding served as stored,
    while its activations, and so its cache, are float32."""
    import torch

    with torch.no_grad():
        out = model(torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=True)
    return out.cache.layers[0].keys.element_size()


def prompt_ids(tokenizer, tokens: int):
    from llmbin.data.text import resolve_text

    ids = tokenizer(resolve_text("wikitext2", "test")[: tokens * 16], return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        sys.exit(f"the test text gave only {ids.shape[1]} tokens, {tokens} asked")
    return ids


def layout_model(model_name: str, spec: str):
    """``--model`` in float32 with every block linear random codes of ``spec`` (``LAYOUT[+tablesBITS]``),
    finished as ``llmbin.quantize`` finishes a model (tables, storage rounding, 16-bit serving). The model
    is opened as quantization opens it (an empty skeleton when its weights stream): only the tensors
    outside the block linears are read, so a 7B shape never exists in float32 (27 GB)."""
    import torch

    from llmbin.checkpoint.io import round_to_storage
    from llmbin.checkpoint.tensors import STORAGE_DTYPE
    from llmbin.driver import module_name
    from llmbin.models import decoder_layers, linear_layers, open_model
    from llmbin.nn.half_weights import serve_half_weights
    from llmbin.nn.table_weights import quantize_tables
    from llmbin.placement import Placement, tensor_names

    sys.path.insert(0, str(Path(__file__).parent))
    from layout_speed import LAYOUTS, random_layout

    layout, _, table_bits = spec.partition("+tables")
    if layout not in LAYOUTS:
        sys.exit(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    opened = open_model(model_name, torch.float32)
    model = opened.model
    if opened.streamed:  # read all but the block linears' weights, which random codes replace
        blocks = decoder_layers(model)
        prefix = module_name(model, blocks)
        replaced = {f"{prefix}.{i}.{name}.weight" for i, block in enumerate(blocks) for name in linear_layers(block)}
        Placement("cpu", opened.weights).onload(model, [n for n in tensor_names(model) if n not in replaced])
        model.tie_weights()  # onloading replaced the embedding's Parameter; restore the tie to the head
    random_layout(model, layout)
    if table_bits:
        quantize_tables(model, int(table_bits), 64)
    round_to_storage(model)
    serve_half_weights(model, STORAGE_DTYPE)
    return model, opened.tokenizer


def llmbin_worker(kind: str, target: str, threads: int, repeats: int, model_name: str = "") -> dict:
    """One llmbin / transformers contender, in this process."""
    import torch

    torch.set_num_threads(threads)
    import llmbin
    from llmbin.checkpoint.io import load_tokenizer
    from llmbin.evaluate.generation import time_decode
    from llmbin.models import load_model

    fast = kind.endswith("-fast")
    if kind.startswith("float-"):
        dtype = torch.bfloat16 if "bf16" in kind else torch.float32
        model, tokenizer = load_model(target, dtype)
    elif kind.startswith("layout"):
        model, tokenizer = layout_model(model_name, target)
    else:
        model, tokenizer = llmbin.load(target, dtype=torch.float32), load_tokenizer(Path(target))
    model.eval()
    ids = prompt_ids(tokenizer, PROMPT_TOKENS)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if fast:
        llmbin.prepare_decode(model)
    start = time.perf_counter()
    reference, _ = time_decode(model, ids, NEW_TOKENS, pad)  # warm-up: kernel load, plans, allocation, compile
    warmup = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        out, timing = time_decode(model, ids, NEW_TOKENS, pad)
        if not torch.equal(out, reference):
            sys.exit(f"{kind}: the timed run's tokens differ from the warm-up's")
        runs.append(timing)
    weights, kv_per_position = model_bytes_per_token(model)
    position = PROMPT_TOKENS + NEW_TOKENS / 2
    return {"prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in runs),
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "decode_runs": [r["decode_tokens_per_s"] for r in runs], "warmup_seconds": warmup,
            "weight_bytes_per_token": weights, "kv_bytes_per_token": kv_per_position * position,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": out[0, PROMPT_TOKENS:].tolist(), "kernel_sources": kernel_sources()}


def kernel_sources() -> str:
    """A digest of llmbin's C++ kernel sources: a saved llmbin row measured with other kernels is
    measured again rather than put in one table with rows of these."""
    import hashlib

    from llmbin.kernels.cpu import SOURCES

    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]


def gguf_bytes_per_token(path: Path) -> tuple[float, float]:
    """Like :func:`model_bytes_per_token`, for a GGUF file: stored tensor bytes (the token embedding
    as one row unless it is also the output matrix), and llama.cpp's f16 KV bytes per position."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    total = sum(int(t.n_bytes) for t in reader.tensors)
    if "output.weight" in tensors:
        emb = tensors["token_embd.weight"]
        total -= int(emb.n_bytes) - int(emb.n_bytes) // int(emb.shape[-1])
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(name):
        return int(reader.fields[f"{arch}.{name}"].parts[-1][0])

    heads = field("attention.head_count")
    kv_heads = field("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in reader.fields else heads
    head_dim = field("embedding_length") // heads
    return float(total), kv_bytes(field("block_count"), kv_heads * head_dim, 2, 1.0)


def run_llama_bench(bench: Path, path: Path, args: list[str], threads: int, repeats: int) -> tuple[list, float]:
    """``llama-bench`` on ``path`` with ``args``: its JSON results and its peak RSS in MiB (from the
    kernel's accounting of the child)."""
    cmd = [str(bench), "-m", str(path), *args, "-t", str(threads), "-r", str(repeats), "-o", "json"]
    print("+", " ".join(cmd), flush=True)
    # a wrapper process whose only child is llama-bench, so that its children's peak RSS is llama-bench's
    wrap = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", wrap, *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"llama-bench failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout), int(proc.stderr.strip().splitlines()[-1]) / 1024


def llamacpp_after_prompt(bench: Path, path: Path, threads: int, repeats: int) -> dict:
    """``llama-bench -n 128 -d 512``: decode after a 512-token context, as llmbin's rows decode after
    the prompt. The issue's ``-p 512 -n 128`` decodes from an empty cache (mean position 64, against
    576), which reads less of the KV cache per token."""
    results, _ = run_llama_bench(bench, path, ["-p", "0", "-n", str(NEW_TOKENS), "-d", str(PROMPT_TOKENS)],
                                 threads, repeats)
    decode = next(r for r in results if r["n_gen"] == NEW_TOKENS and r.get("n_depth") == PROMPT_TOKENS)
    _, kv_per_position = gguf_bytes_per_token(path)
    return {"decode_after_prompt_tokens_per_s": decode["avg_ts"], "decode_after_prompt_runs": decode.get("samples_ts"),
            "kv_bytes_per_token_after_prompt": kv_per_position * (PROMPT_TOKENS + NEW_TOKENS / 2)}


def llamacpp_row(bench: Path, path: Path, threads: int, repeats: int) -> dict:
    """``llama-bench -p 512 -n 128`` on ``path``, and its decode after the prompt (:func:`llamacpp_after_prompt`)."""
    results, rss_mib = run_llama_bench(bench, path, ["-p", str(PROMPT_TOKENS), "-n", str(NEW_TOKENS)], threads,
                                       repeats)
    prefill = next(r for r in results if r["n_prompt"] == PROMPT_TOKENS and r["n_gen"] == 0)
    decode = next(r for r in results if r["n_gen"] == NEW_TOKENS and r["n_prompt"] == 0)
    weights, kv_per_position = gguf_bytes_per_token(path)
    return {"prefill_tokens_per_s": prefill["avg_ts"], "decode_tokens_per_s": decode["avg_ts"],
            "decode_runs": decode.get("samples_ts"), "weight_bytes_per_token": weights,
            # llama-bench's tg test starts from an empty cache: its mean position is NEW_TOKENS / 2
            "kv_bytes_per_token": kv_per_position * NEW_TOKENS / 2,
            "peak_rss_mib": rss_mib,
            "build": results[0].get("build_commit"), "type": results[0].get("model_type"),
            **llamacpp_after_prompt(bench, path, threads, repeats)}


def llamacpp_file(root: Path | None, model: str, qtype: str) -> Path:
    """The file ``eval/llamacpp_peer.py quantize --dir ROOT --model MODEL --types QTYPE`` wrote."""
    sys.path.insert(0, str(Path(__file__).parent))
    from llamacpp_peer import source_gguf, type_file

    if root is None:
        sys.exit("--gguf-types needs --llamacpp DIR (eval/llamacpp_peer.py build --dir DIR)")
    source = source_gguf(model)
    if source.suffix != ".gguf":
        sys.exit(f"--gguf-types needs --gguf-model (or --model) to be a GGUF file (or smollm2-135m), not {model}")
    path = type_file(root, source, qtype)
    if not path.is_file():
        sys.exit(f"{path} is missing; run: python eval/llamacpp_peer.py quantize --dir {root} --model {source} "
                 f"--types {qtype}")
    return path


def copy_bandwidth() -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_benchmark import copy_bandwidth as measure

    return measure()


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = rows.get("float-bf16", {}).get("decode_tokens_per_s")
    lines = [f"Decode benchmark: {result['model']}, batch 1, greedy, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new "
             f"tokens, {result['threads']} threads; {result['machine']}; copy bandwidth "
             f"{result['copy_bandwidth_gbs']:.1f} GB/s.", "",
             "| contender | bytes/token MB | prefill tok/s | decode tok/s | decode tok/s after the prompt | "
             "× bf16 float | % of bytes limit | peak RSS MiB | warm-up s | tokens as eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        per_token = row["weight_bytes_per_token"] + row["kv_bytes_per_token"]
        limit = result["copy_bandwidth_gbs"] * 1e9 / per_token
        decode = row["decode_tokens_per_s"]
        ratio = f"{decode / base:.2f}" if base else "n/a"
        rss = f"{row['peak_rss_mib']:.0f}" if row.get("peak_rss_mib") else "n/a"
        warm = f"{row['warmup_seconds']:.0f}" if "warmup_seconds" in row else "n/a"
        eager = rows.get(name[: -len("-fast")]) if name.endswith("-fast") else None
        same = "n/a" if eager is None else ("same" if eager.get("tokens") == row.get("tokens") else "differ")
        # llmbin's rows decode after the prompt; llama-bench's tg test from an empty cache, so its rows add -d 512
        after = row.get("decode_after_prompt_tokens_per_s", decode if row.get("kind") != "gguf" else None)
        after = "n/a" if after is None else f"{after:.1f}"
        lines.append(f"| {name} | {per_token / 1e6:.1f} | {row['prefill_tokens_per_s']:.1f} | {decode:.1f} | {after} | "
                     f"{ratio} | {100 * decode / limit:.0f} % | {rss} | {warm} | {same} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("runs/decode"))
    p.add_argument("--model", default="smollm2-135m", help="the original model (llmbin's --model)")
    p.add_argument("--checkpoint", action="append", default=[], help="NAME=DIR: a packed checkpoint of --model")
    p.add_argument("--layout", action="append", default=[],
                   help="LAYOUT[+tables8]: --model with random codes of a recipe's layout (speed only)")
    p.add_argument("--gguf", action="append", default=[], help="NAME=FILE: a llama.cpp file of the same weights")
    p.add_argument("--llamacpp", type=Path, help="eval/llamacpp_peer.py's --dir (for llama-bench)")
    p.add_argument("--gguf-types", default="", help="TYPE,...: the files eval/llamacpp_peer.py quantize made of "
                   "--gguf-model in --llamacpp")
    p.add_argument("--gguf-model", help="the GGUF those files were made of (default: --model; the random 7B shape's "
                   "F16 file from eval/random_checkpoint.py --gguf)")
    p.add_argument("--run", action="append", help="only these contenders (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fresh", action="store_true", help="re-measure contenders already saved")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(llmbin_worker(*args.worker, args.threads, args.repeats, args.model)))
        return
    contenders = {"float-fp32": ("float-fp32", args.model), "float-bf16": ("float-bf16", args.model),
                  "float-bf16-fast": ("float-bf16-fast", args.model)}
    for spec in args.checkpoint:
        name, directory = spec.split("=", 1)
        contenders[name] = ("packed", directory)
        contenders[f"{name}-fast"] = ("packed-fast", directory)
    for spec in args.layout:
        contenders[f"layout:{spec}"] = ("layout", spec)
        contenders[f"layout:{spec}-fast"] = ("layout-fast", spec)
    for spec in args.gguf:
        name, path = spec.split("=", 1)
        contenders[f"gguf:{name}"] = ("gguf", path)
    for qtype in filter(None, args.gguf_types.split(",")):
        contenders[f"gguf:{qtype}"] = ("gguf", str(llamacpp_file(args.llamacpp, args.gguf_model or args.model, qtype)))
    unknown = set(args.run or []) - set(contenders)
    if unknown:
        sys.exit(f"unknown contenders {sorted(unknown)}; known: {', '.join(contenders)}")
    saved = args.out_dir / "rows"
    saved.mkdir(parents=True, exist_ok=True)
    for name, (kind, target) in contenders.items():
        if args.run and name not in args.run:
            continue
        path = saved / f"{name.replace(':', '-')}.json"
        row = json.loads(path.read_text()) if path.exists() and not args.fresh else None
        if row is not None and kind != "gguf" and row.get("kernel_sources") != kernel_sources():
            print(f"{name}: saved with other kernel sources ({row.get('kernel_sources', 'not recorded')}, now "
                  f"{kernel_sources()}): measuring again", flush=True)
            row = None
        if row is not None:
            if kind == "gguf" and "decode_after_prompt_tokens_per_s" not in row and args.llamacpp is not None:
                # a row saved before the after-prompt figure existed: measure that alone
                row.update(llamacpp_after_prompt(args.llamacpp / "build" / "bin" / "llama-bench", Path(target),
                                                 args.threads, args.repeats))
                path.write_text(json.dumps(row, indent=1))
            print(f"{name}: kept ({path})")
            continue
        if kind == "gguf":
            if args.llamacpp is None:
                sys.exit("--gguf needs --llamacpp DIR (eval/llamacpp_peer.py build --dir DIR)")
            row = llamacpp_row(args.llamacpp / "build" / "bin" / "llama-bench", Path(target), args.threads,
                               args.repeats)
        else:
            out = subprocess.run([sys.executable, __file__, "--worker", kind, target, "--threads", str(args.threads),
                                  "--repeats", str(args.repeats), "--model", args.model], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if out.returncode:
                sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(kind=kind, target=str(target))
        path.write_text(json.dumps(row, indent=1))
        print(f"{name}: prefill {row['prefill_tokens_per_s']:.1f}, decode {row['decode_tokens_per_s']:.1f} tokens/s",
              flush=True)
    rows = {f.stem: json.loads(f.read_text()) for f in sorted(saved.glob("*.json"))}
    rows = {name.replace("gguf-", "gguf:", 1).replace("layout-", "layout:", 1): row for name, row in rows.items()}
    result = {"model": args.model, "threads": args.threads, "repeats": args.repeats,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "copy_bandwidth_gbs": copy_bandwidth(), "rows": rows,
              "command": " ".join(["python", *sys.argv])}
    (args.out_dir / "decode.json").write_text(json.dumps(result, indent=1))
    (args.out_dir / "decode.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
