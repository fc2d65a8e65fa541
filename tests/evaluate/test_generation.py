"""``llmbin generate``: the streamed text is model.generate's greedy continuation, timed apart."""
import json

import pytest
import torch

import llmbin
from llmbin.cli import main
from llmbin.errors import LlmbinError
from llmbin.evaluate.generation import time_decode, timed_generate
from tests.conftest import packed_checkpoint, tiny_model

PROMPT = "the model binary weight scale layer"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    calibration = tokenizer(" ".join([PROMPT] * 16), return_tensors="pt").input_ids[:, :64].reshape(2, 32)
    return packed_checkpoint(tiny_model(), calibration, tmp_path_factory.mktemp("gen") / "ckpt", tokenizer)


def _reference(model, tokenizer, new):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1]


def test_the_timed_text_is_the_greedy_continuation(tokenizer, capsys):
    model = tiny_model()
    model.generation_config.eos_token_id = None  # all 12 tokens, so that decode has a rate
    result = timed_generate(model, tokenizer, PROMPT, max_new_tokens=12)
    text, count = _reference(model, tokenizer, 12)
    assert (result["text"], result["new_tokens"], result["prompt_tokens"]) == (text, 12, len(tokenizer(PROMPT).input_ids))
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert capsys.readouterr().out.strip() == text.strip()  # streamed as it came
    assert timed_generate(model, tokenizer, PROMPT, max_new_tokens=1, echo=False)["decode_tokens_per_s"] is None


def test_a_timed_decode_runs_past_end_of_text_as_plain_greedy_decoding(tokenizer):
    # the benchmark's tokens are the greedy ones, all of them, even when end-of-text comes first
    model = tiny_model()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model.generation_config.eos_token_id = None
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.generation_config.eos_token_id = int(greedy[0, ids.shape[1]])  # the first new token ends the text
    out, timing = time_decode(model, ids, 8)
    assert torch.equal(out, greedy) and timing["new_tokens"] == 8
    assert model.generation_config.eos_token_id == int(greedy[0, ids.shape[1]])  # the model's own setting is kept


def test_generate_on_a_checkpoint_streams_its_text_and_reports_speeds(saved, tokenizer, tmp_path, capsys):
    _, out = saved
    text, count = _reference(llmbin.load(out), tokenizer, 6)  # as the loaded checkpoint generates it, EOS included
    assert main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "6", "--json", str(tmp_path / "g.json"),
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    printed = capsys.readouterr().out
    assert (report["text"], report["new_tokens"]) == (text, count) and 1 <= count <= 6
    assert printed.startswith(PROMPT + text) and printed.splitlines()[-1].startswith("prefill ")
    assert "tokens/s" in printed.splitlines()[-1] and report["peak_rss_mib"] >= report["load_peak_rss_mib"] > 0


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "x"], "give either a checkpoint directory or --model MODEL, not both or neither"),
    (["generate", "c", "--model", "m", "--prompt", "x"], "give either a checkpoint directory or --model MODEL"),
    (["generate", "c", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
])
def test_bad_generate_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_empty_prompt_is_refused(tokenizer):
    with pytest.raises(LlmbinError, match="the prompt has no tokens"):
        timed_generate(tiny_model(), tokenizer, "", max_new_tokens=2)
