import json

import pytest
import torch

import llmbin
from llmbin.cli import main


def _quantize(model_dir, text_file, out, *extra):
    return main(["quantize", "--model", str(model_dir), "--method", "pb-llm", "--calib-data", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--no-progress", *extra])


def test_quantize_then_eval_end_to_end(tiny_model_dir, text_file, tmp_path, tokenizer):
    out = tmp_path / "ckpt"
    assert _quantize(tiny_model_dir, text_file, out, "--salient-frac", "0.2", "--json", str(tmp_path / "q.json")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                    "tokenizer_config.json"]
    assert not (tmp_path / "ckpt.partial").exists()
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["config"]["salient_frac"] == 0.2 and report["disk_bytes"] > 0 and report["quantize_seconds"] > 0

    assert main(["eval", str(out), "--eval-data", str(text_file), "--seqlen", "32", "--max-windows", "5",
                 "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result) >= {"ppl", "bits_per_weight"}
    assert 0 < result["load_peak_rss_mib"] <= result["peak_rss_mib"]  # memory after loading, then after the windows
    ppl = result["ppl"]["wikitext2"]
    assert result["bits_per_weight"] == pytest.approx(report["bits_per_weight"])

    # the loaded checkpoint's perplexity is the in-memory model's (identical computation)
    from llmbin.data.text import resolve_text
    from llmbin.evaluate.perplexity import perplexity

    ids = tokenizer(resolve_text(str(text_file), "test"), return_tensors="pt").input_ids[0]
    assert perplexity(llmbin.load(out), ids, 32, 5, progress=False) == ppl

    assert main(["eval", "--model", str(tiny_model_dir), "--eval-data", str(text_file), "--seqlen", "32",
                 "--max-windows", "5", "--json", str(tmp_path / "f.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["bits_per_weight"] is None


def _error_of(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("llmbin: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_get_one_line_errors(tiny_model_dir, text_file, tmp_path, capsys):
    q = ["quantize", "--method", "pb-llm", "--calib-data", str(text_file), "--nsamples", "2", "--seqlen", "32",
         "--no-progress"]
    assert "does not exist" in _error_of(capsys, q + ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "no config.json" in _error_of(capsys, q + ["--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "salient-frac" in _error_of(capsys, q + ["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
                                                    "--salient-frac", "2"])
    sideways = tmp_path / "sideways.yaml"  # the command line's --rotate has choices; a recipe's value is checked too
    sideways.write_text("method: pb-llm\nrotate: sideways\n")
    by_recipe = q[:1] + q[3:] + ["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--recipe", str(sideways)]
    assert "--rotate must be one of none, input, both, got 'sideways'" in _error_of(capsys, by_recipe)
    assert "already exists" in _error_of(capsys, q + ["--model", str(tiny_model_dir), "--out", str(tmp_path)])
    short = tmp_path / "short.txt"
    short.write_text("the model")
    err = _error_of(capsys, ["quantize", "--model", str(tiny_model_dir), "--method", "pb-llm", "--calib-data",
                             str(short), "--seqlen", "32", "--out", str(tmp_path / "o"), "--no-progress"])
    assert "shorter than one window" in err
    assert not (tmp_path / "o").exists()
    assert "not an llmbin checkpoint" in _error_of(capsys, ["eval", str(tmp_path), "--eval-data", str(text_file)])
    assert "either a checkpoint" in _error_of(capsys, ["eval", "--eval-data", str(text_file)])


def test_unknown_method_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", "x", "--method", "xnor", "--out", "y"])
    assert exc.value.code == 2 and "unknown method 'xnor' (choose from arb-rc, billm" in capsys.readouterr().err


def test_a_former_method_that_is_a_recipe_now_names_the_recipe(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", "x", "--method", "arb-x", "--out", "y"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "arb-x is a recipe now, not a method: use --recipe arb-x" in err
    assert len(err.strip().splitlines()) == 1


def test_interrupted_run_resumes(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    import llmbin.checkpoint.resume

    out = tmp_path / "ckpt"
    original = llmbin.checkpoint.resume.BlockStore.save

    def save_then_interrupt(self, index, modules):
        original(self, index, modules)
        raise KeyboardInterrupt

    monkeypatch.setattr(llmbin.checkpoint.resume.BlockStore, "save", save_then_interrupt)
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "pb-llm", "--calib-data", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--no-progress"]) == 2
    assert (tmp_path / "ckpt.partial" / "block_00000.safetensors").exists() and not out.exists()
    monkeypatch.setattr(llmbin.checkpoint.resume.BlockStore, "save", original)
    capsys.readouterr()
    assert _quantize(tiny_model_dir, text_file, out) == 0
    resumed = f"resuming: block 0 of 2 is done in {tmp_path / 'ckpt.partial'}; continuing at block 1\n"
    assert resumed in capsys.readouterr().out
    reference = tmp_path / "reference"
    assert _quantize(tiny_model_dir, text_file, reference) == 0
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(llmbin.load(out)(x).logits, llmbin.load(reference)(x).logits)


def test_recipe_with_command_line_override(tiny_model_dir, text_file, tmp_path):
    recipe = tmp_path / "billm.yaml"
    recipe.write_text("method: billm\nmax_salient_columns: 7\nsplit_points: 9\nblocksize: 32\n")
    out = tmp_path / "ckpt"
    assert main(["quantize", "--model", str(tiny_model_dir), "--recipe", str(recipe), "--split-points", "5",
                 "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out),
                 "--no-progress", "--json", str(tmp_path / "q.json")]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["method"], q["max_salient_columns"], q["split_points"], q["blocksize"]) == ("billm", 7, 5, 32)
    assert json.loads((tmp_path / "q.json").read_text())["recipe"] == str(recipe)


def test_quantize_needs_a_method_or_a_recipe(tiny_model_dir, text_file, tmp_path, capsys):
    err = _error_of(capsys, ["quantize", "--model", str(tiny_model_dir), "--calib-data", str(text_file),
                             "--out", str(tmp_path / "o"), "--no-progress"])
    assert "--method or --recipe" in err
    err = _error_of(capsys, ["quantize", "--model", str(tiny_model_dir), "--recipe", str(tmp_path / "x.yaml"),
                             "--calib-data", str(text_file), "--out", str(tmp_path / "o"), "--no-progress"])
    assert "is neither a file nor a shipped recipe" in err


def test_sharded_16_bit_folder_with_the_scale_options(tiny_sharded_dir, text_file, tmp_path, capsys):
    """A bf16 sharded folder streams (reported), --dtype and --offload-activations change nothing
    in the result, --stop-after-blocks stops and the same run then resumes, eval takes a device map."""
    args = ["quantize", "--model", str(tiny_sharded_dir), "--method", "pb-llm", "--calib-data", str(text_file),
            "--nsamples", "4", "--seqlen", "32", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a"), "--json", str(tmp_path / "a.json")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["streamed"] and report["dtype"] == "float32" and set(report["timings"]["block_seconds"]) == {"0", "1"}
    assert main(args + ["--out", str(tmp_path / "b"), "--dtype", "float32", "--offload-activations",
                        str(tmp_path / "acts"), "--stop-after-blocks", "1", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["stopped_after_blocks"] == 1
    assert not (tmp_path / "b").exists() and (tmp_path / "b.partial" / "block_00000.safetensors").exists()
    out = capsys.readouterr().out
    assert "stopped after 1 block as asked" in out and "rerun without --stop-after-blocks" in out
    assert main(args + ["--out", str(tmp_path / "b"), "--offload-activations", str(tmp_path / "acts")]) == 0
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert torch.equal(llmbin.load(tmp_path / "a")(x).logits, llmbin.load(tmp_path / "b")(x).logits)
    evaluate = ["eval", str(tmp_path / "a"), "--eval-data", str(text_file), "--seqlen", "32", "--max-windows", "2",
                "--no-progress", "--json"]
    assert main(evaluate + [str(tmp_path / "e1.json")]) == 0
    assert main(evaluate + [str(tmp_path / "e2.json"), "--device-map", '{"": "cpu"}']) == 0
    ppl = [json.loads((tmp_path / f"e{i}.json").read_text())["ppl"]["wikitext2"] for i in (1, 2)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)  # the device map serves float layers at fp32, not from fp16


def test_bad_scale_options_get_one_line_errors(tiny_sharded_dir, text_file, tmp_path, capsys):
    q = ["quantize", "--model", str(tiny_sharded_dir), "--method", "pb-llm", "--calib-data", str(text_file),
         "--nsamples", "2", "--seqlen", "32", "--no-progress", "--out", str(tmp_path / "o")]
    assert "--stop-after-blocks must be at least 1" in _error_of(capsys, q + ["--stop-after-blocks", "0"])
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert "choose another --offload-activations" in _error_of(capsys, q + ["--offload-activations", str(blocked / "x")])
    assert "--device-map must be 'auto' or a JSON object" in _error_of(capsys, ["eval", str(tmp_path), "--device-map", "gpu0"])


@pytest.mark.parametrize("damage,message,extra", [
    (lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith("tokenizer")], "has no tokenizer files", []),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), "does not match its recorded digest", []),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), "cannot be loaded", ["--no-verify"]),
])
def test_a_checkpoint_without_a_usable_tokenizer_gets_a_one_line_error(tiny_model_dir, text_file, tmp_path, capsys,
                                                                       damage, message, extra):
    out = tmp_path / "ckpt"
    assert _quantize(tiny_model_dir, text_file, out) == 0
    damage(out)
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-data", str(text_file), "--seqlen", "32", "--max-windows", "1",
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "copy" in err


def test_a_shipped_recipe_by_name_from_another_folder(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--model", str(tiny_model_dir), "--recipe", "rtn-sign", "--calib-data", str(text_file),
                 "--nsamples", "2", "--seqlen", "32", "--out", "ckpt", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["method"] == "rtn-sign"


def test_a_mistyped_model_folder_is_no_such_folder_not_a_network_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_model_dir.parent)  # holds the folder tiny-llama
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    q = ["quantize", "--method", "pb-llm", "--out", str(tmp_path / "o")]
    assert _error_of(capsys, q + ["--model", "tiny-lama"]) == (
        "llmbin: error: no such folder tiny-lama (did you mean tiny-llama?), and the Hugging Face hub does not answer "
        "(offline), so it cannot be downloaded as a hub id either; check the path, or go online")
    assert _error_of(capsys, q + ["--model", "./tiny-lama"]) == (
        "llmbin: error: model folder ./tiny-lama does not exist (did you mean tiny-llama?); check the path")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_eval_of_an_original_model_folder_suggests_model(tiny_model_dir, capsys):
    folder = str(tiny_model_dir)
    assert _error_of(capsys, ["eval", folder]) == (
        f"llmbin: error: {folder} is a model folder, not an llmbin checkpoint (its config.json has no llmbin "
        f"quantization_config): to evaluate the original model use llmbin eval --model {folder}; to make a "
        f"checkpoint of it, llmbin quantize --model {folder}")
    assert _error_of(capsys, ["eval", "model.gguf"]) == (
        "llmbin: error: model.gguf is a GGUF file, not an llmbin checkpoint folder: to evaluate the original model use "
        "llmbin eval --model model.gguf")


def test_standard_calibration_data_offline_fails_at_once_naming_a_local_file(tiny_model_dir, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _error_of(capsys, ["quantize", "--model", str(tiny_model_dir), "--method", "pb-llm", "--calib-data", "c4",
                              "--out", str(tmp_path / "o"), "--no-progress"]) == (
        "llmbin: error: c4 cannot be downloaded: the Hugging Face hub does not answer (offline) and no cached copy "
        "was found; give a local .parquet/.jsonl/.txt file (--calib-data PATH)")


def test_tune_from_the_command_line_records_its_losses_and_options(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _quantize(tiny_model_dir, text_file, out, "--tune", "--tune-steps", "3", "--json",
                     str(tmp_path / "q.json")) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["config"]["tune"] is True and report["config"]["tune_steps"] == 3
    assert set(report["timings"]["tune"]) == {"0", "1"}
    assert all(step["loss_first"] > 0 and step["seconds"] > 0 for step in report["timings"]["tune"].values())
    assert llmbin.load(out).config.quantization_config.tune_steps == 3
    err = _error_of(capsys, ["quantize", "--model", str(tiny_model_dir), "--method", "pb-llm", "--calib-data",
                             str(text_file), "--out", str(tmp_path / "o"), "--tune", "--tune-steps", "0"])
    assert "--tune-steps" in err


@pytest.mark.parametrize("given, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                             ({"GOMP_SPINCOUNT": "300000"}, None)])
def test_quantize_makes_openmp_threads_wait_passively_unless_told_otherwise(given, expected):
    # spinning threads made reconstruction 10-50x slower beside a busy process (docs/distributed.md#threads)
    import os
    import subprocess
    import sys

    code = ("import os, sys\nfrom llmbin.cli import main\nmain(['quantize', '--model', 'm', '--out', 'o'])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True)
    assert done.stdout.split() == [str(expected), "False"], done.stderr[-2000:]  # set before torch loads
