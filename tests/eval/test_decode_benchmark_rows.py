"""The decode benchmark's rows: llama-bench's figures as recorded, the decode after the prompt
included (``-d 512``); a llama.cpp row kept from before that figure gets it without a full rerun,
and a kept llmbin row measured with other kernel sources is measured again."""
import json
import stat
import sys

import decode_benchmark
import pytest

# A stand-in llama-bench: logs its arguments, prints JSON results for the tests they ask for.
FAKE_BENCH = r'''#!PYTHON
import json, sys
args = sys.argv[1:]
open(sys.argv[0] + ".log", "a").write(" ".join(args) + "\n")
p, n, d = (int(args[args.index(f) + 1]) if f in args else 0 for f in ("-p", "-n", "-d"))
rows = []
if p:
    rows.append({"n_prompt": p, "n_gen": 0, "n_depth": d, "avg_ts": 100.0, "samples_ts": [100.0]})
if n:
    rows.append({"n_prompt": 0, "n_gen": n, "n_depth": d, "avg_ts": 20.0 if d == 0 else 15.0, "samples_ts": [1.0]})
rows[0].update(build_commit="abc", model_type="llama 7B IQ2_XXS")
print(json.dumps(rows))
'''


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    bench = tmp_path / "build" / "bin" / "llama-bench"  # where eval/llamacpp_peer.py build puts it
    bench.parent.mkdir(parents=True)
    bench.write_text(FAKE_BENCH.replace("PYTHON", sys.executable))
    bench.chmod(bench.stat().st_mode | stat.S_IEXEC)
    # 1 GB of weights and 1000 KV bytes per position, without a GGUF file
    monkeypatch.setattr(decode_benchmark, "gguf_bytes_per_token", lambda path: (1e9, 1000.0))
    return bench


def test_a_llamacpp_row_has_both_decodes(fake_bench, tmp_path):
    row = decode_benchmark.llamacpp_row(fake_bench, tmp_path / "m.gguf", threads=2, repeats=2)
    assert (row["prefill_tokens_per_s"], row["decode_tokens_per_s"], row["decode_after_prompt_tokens_per_s"]) == (
        100.0, 20.0, 15.0)
    assert row["kv_bytes_per_token"] == 1000.0 * 64 and row["kv_bytes_per_token_after_prompt"] == 1000.0 * 576
    calls = (fake_bench.parent / "llama-bench.log").read_text().splitlines()
    assert [c.split(" -t ")[0].split(" ", 2)[2] for c in calls] == ["-p 512 -n 128", "-p 0 -n 128 -d 512"]


def test_a_kept_row_gains_the_after_prompt_decode_alone(fake_bench, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    kept = {"prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 2.0, "weight_bytes_per_token": 1e9,
            "kv_bytes_per_token": 64e3, "kind": "gguf", "target": "m.gguf"}
    (out / "rows" / "gguf-m.json").write_text(json.dumps(kept))
    monkeypatch.setattr(decode_benchmark, "copy_bandwidth", lambda: 30.0)
    monkeypatch.setattr(sys, "argv", ["decode_benchmark.py", "--out-dir", str(out), "--run", "gguf:m",
                                      "--gguf", f"m={tmp_path / 'm.gguf'}", "--llamacpp", str(tmp_path)])
    decode_benchmark.main()
    row = json.loads((out / "rows" / "gguf-m.json").read_text())
    assert row["decode_tokens_per_s"] == 2.0 and row["decode_after_prompt_tokens_per_s"] == 15.0
    assert (fake_bench.parent / "llama-bench.log").read_text().count("\n") == 1  # the -d 512 run only
    assert "| gguf:m | 1000.1 | 1.0 | 2.0 | 15.0 |" in (out / "decode.md").read_text()


@pytest.mark.parametrize("saved_sources, measured", [("0123456789ab", True), (None, True), ("current", False)])
def test_a_kept_llmbin_row_from_other_kernels_is_measured_again(tmp_path, monkeypatch, saved_sources, measured):
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    current = decode_benchmark.kernel_sources()
    saved = {"prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 2.0, "weight_bytes_per_token": 1e8,
             "kv_bytes_per_token": 1e6, "kind": "layout-fast", "target": "sign-per-row"}
    if saved_sources:
        saved["kernel_sources"] = current if saved_sources == "current" else saved_sources
    (out / "rows" / "layout-sign-per-row-fast.json").write_text(json.dumps(saved))
    workers = []

    def worker(cmd, **kwargs):  # the measuring subprocess, stood in for
        workers.append(cmd)
        row = {**saved, "decode_tokens_per_s": 9.0, "kernel_sources": current}
        return type("Done", (), {"returncode": 0, "stdout": json.dumps(row), "stderr": ""})()

    monkeypatch.setattr(decode_benchmark.subprocess, "run", worker)
    monkeypatch.setattr(decode_benchmark, "copy_bandwidth", lambda: 30.0)
    monkeypatch.setattr(sys, "argv", ["decode_benchmark.py", "--out-dir", str(out), "--layout", "sign-per-row",
                                      "--run", "layout:sign-per-row-fast"])
    decode_benchmark.main()
    row = json.loads((out / "rows" / "layout-sign-per-row-fast.json").read_text())
    assert len(workers) == measured and row["decode_tokens_per_s"] == (9.0 if measured else 2.0)
    assert row["kernel_sources"] == current
