"""What the checkpoint digests cost: verifying a checkpoint's files, and loading it with and without
verification (file contents in the page cache, so the figures are CPU cost, not disk speed).

    python eval/verify_benchmark.py CHECKPOINT [--repeats 5] [--json FILE]

A version-4 checkpoint (no digests) is first re-saved through ``save_pretrained`` into a temporary
folder, which records them. Each load runs in a fresh process, so nothing is cached in Python.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = ("import sys, time, torch, llmbin; t = time.perf_counter(); "
        "llmbin.load(sys.argv[1], verify=sys.argv[2] == '1'); print(time.perf_counter() - t)")


def with_digests(checkpoint: Path, scratch: Path) -> Path:
    import llmbin
    from llmbin.checkpoint.digests import file_header_json

    files = sorted(checkpoint.glob("*.safetensors"))
    if all("digests" in (file_header_json(f)[0].get("__metadata__") or {}) for f in files):
        return checkpoint
    model = llmbin.load(checkpoint)
    out = scratch / "resaved"
    model.save_pretrained(out)
    for name in checkpoint.iterdir():  # tokenizer files
        if name.name.startswith(("tokenizer", "special_tokens")):
            (out / name.name).write_bytes(name.read_bytes())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()

    from llmbin.checkpoint.digests import file_digests

    with tempfile.TemporaryDirectory() as scratch:
        ckpt = with_digests(Path(args.checkpoint), Path(scratch))
        files = sorted(ckpt.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache
            f.read_bytes()
        hashing = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for f in files:
                file_digests(f)
            hashing.append(time.perf_counter() - t)
        loads = {}
        for verify in ("1", "0"):
            loads[verify] = [float(subprocess.run([sys.executable, "-c", LOAD, str(ckpt), verify], check=True,
                                                  capture_output=True, text=True).stdout.split()[-1])
                             for _ in range(args.repeats)]
    result = {"checkpoint": args.checkpoint, "bytes": size, "repeats": args.repeats,
              "verify_seconds": statistics.median(hashing), "verify_GBps": size / statistics.median(hashing) / 1e9,
              "load_seconds_verified": statistics.median(loads["1"]), "load_seconds_unverified": statistics.median(loads["0"])}
    print("| checkpoint MiB | verify all files s (GB/s) | load, verified s | load, --no-verify s |")
    print("|---|---|---|---|")
    print(f"| {size / 2**20:.1f} | {result['verify_seconds']:.3f} ({result['verify_GBps']:.2f}) | "
          f"{result['load_seconds_verified']:.3f} | {result['load_seconds_unverified']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
