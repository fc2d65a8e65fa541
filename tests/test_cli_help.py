"""``llmbin --help``: every option's default, which methods use each method option, choices; usage
errors in one line; and none of it waits for torch or transformers."""
import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from llmbin.cli import build_parser, main, method_configs, method_option_table, methods_and_defaults
from llmbin.config import OPTION_CHOICES, OPTION_HELP, SALIENT_METRICS, PBLLMConfig
from llmbin.errors import LlmbinError


def _subparser(name):
    parser, _ = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _option(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_the_methods_are_the_registered_ones():
    from llmbin.config import available_methods

    assert sorted(cls.method for cls in method_configs()) == available_methods()


def test_every_config_field_has_help_and_an_option():
    q = _subparser("quantize")
    for cls in method_configs():
        for field in dataclasses.fields(cls):
            assert OPTION_HELP.get(field.name), f"add a line for {field.name} to llmbin.config.OPTION_HELP"
            _option(q, "--" + field.name.replace("_", "-"))


def test_every_method_option_shows_its_methods_and_defaults():
    q = _subparser("quantize")
    methods = [cls.method for cls in method_configs()]
    text = q.format_help()
    for name, (_, defaults) in method_option_table().items():
        action = _option(q, "--" + name.replace("_", "-"))
        assert action.default is None  # a value not given stays the method's or the recipe's
        assert action.help.startswith(OPTION_HELP[name].replace("%", "%%"))
        assert methods_and_defaults(defaults, methods) in action.help.replace("%%", "%")
        everyone = len(defaults) == len(methods) and len(set(map(str, defaults.values()))) == 1
        assert "all methods" in action.help if everyone else all(m in action.help for m in defaults)
    assert "(pb-llm; default: 0.1)" in " ".join(text.split())  # salient_frac, as a user reads it


def test_defaults_that_differ_by_method_are_named_per_method():
    assert methods_and_defaults({"a": 1, "b": 1}, ["a", "b"]) == "all methods; default: 1"
    assert methods_and_defaults({"a": "x"}, ["a", "b"]) == "a; default: x"
    assert methods_and_defaults({"a": True, "b": False, "c": True}, ["a", "b", "c"]) == "default: a, c true; b false"


def test_choice_options_list_their_choices():
    text = " ".join(_subparser("quantize").format_help().split())
    assert "--rotate {none,input,both}" in text and "--salient-metric {hessian,magnitude}" in text
    assert "--method {" in text and "--dtype {auto,bfloat16,float16,float32}" in text
    for name, choices in OPTION_CHOICES.items():
        assert _option(_subparser("quantize"), "--" + name.replace("_", "-")).choices == choices


def test_the_salient_metric_choices_are_the_ones_the_configs_accept():
    for metric in SALIENT_METRICS:
        PBLLMConfig(salient_metric=metric).validate()
    with pytest.raises(LlmbinError):
        PBLLMConfig(salient_metric="random").validate()


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_every_option_with_a_default_shows_it(command):
    parser = _subparser(command)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            shown = " ".join(parser._get_formatter()._expand_help(action).split())
            assert shown.endswith(f"(default: {action.default})"), action.option_strings
    if command == "quantize":
        for flag, default in (("--nsamples", 128), ("--seqlen", 2048), ("--seed", 0)):
            assert _option(parser, flag).help and _option(parser, flag).default == default
        assert "calibrates on 128 windows of 2048 tokens of wikitext2" in text
        assert "pb-llm-10" in text  # the shipped recipes are listed


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--model", "x"], "the following arguments are required: --out; see llmbin quantize --help"),
    (["quantize", "--model", "x", "--out", "y", "--rotate", "sideways"],
     "argument --rotate: invalid choice: 'sideways' (choose from none, input, both); see llmbin quantize --help"),
    (["quantize", "--model", "x", "--out", "y", "--nsamples", "many"],
     "argument --nsamples: invalid int value: 'many'; see llmbin quantize --help"),
    (["eval", "--bogus"], "unrecognized arguments: --bogus; see llmbin eval --help"),
    ([], "the following arguments are required: {quantize,eval,generate}; see llmbin --help"),
])
def test_a_usage_error_is_one_line_and_a_pointer_to_help(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.replace("'none', 'input', 'both'", "none, input, both") == f"llmbin: error: {message}\n"


def test_help_and_option_errors_do_not_import_torch_or_transformers():
    code = """
import contextlib, io, json, sys
from llmbin.cli import main
runs = []
for argv in (["--help"], ["quantize", "--help"], ["eval", "--help"], ["quantize", "--model", "x"],
             ["quantize", "--model", "x", "--out", "y", "--method", "pb-llm", "--nsamples", "0"],
             ["quantize", "--model", "x", "--out", "y", "--recipe", "no-such-recipe"]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    runs.append([code, err.getvalue()])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "datasets", "numpy"))
print(json.dumps({"runs": runs, "heavy": heavy}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["heavy"] == []
    assert [code for code, _ in result["runs"]] == [0, 0, 0, 2, 2, 2]
    assert "--nsamples and --seqlen must be positive" in result["runs"][4][1]
    assert "shipped recipes" in result["runs"][5][1]


def test_the_version_needs_no_torch():
    from llmbin.version import __version__

    code = "import sys\nfrom llmbin.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["llmbin", __version__, "False"]
