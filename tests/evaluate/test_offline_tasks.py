"""The offline task definitions in llmbin/evaluate/tasks/: every task loads from $LLMBIN_DATA/zeroshot with
the hub's fields, and its prompt, choices, target and metrics are lm-eval's own."""
import bz2
import importlib.util
import os
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.tasks import TaskManager

from llmbin.data.paths import local_data_dir
from llmbin.evaluate.zeroshot import OFFLINE_TASKS, TASK_DIR

DATA = local_data_dir() / "zeroshot"
# task -> (split, examples, choices per example)
EXPECTED = {"piqa": ("validation", 1838, 2), "arc_easy": ("test", 2376, None), "arc_challenge": ("test", 1172, None),
            "winogrande": ("validation", 1267, 2), "hellaswag": ("validation", 10042, 4)}
PROMPT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "process_docs")


@pytest.fixture(scope="module")
def tasks():
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(DATA)})
    return manager.load(list(OFFLINE_TASKS))["tasks"]


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_every_task_loads_with_the_right_choices_and_gold_in_range(tasks, name):
    task = tasks[name]
    split, count, n_choices = EXPECTED[name]
    docs = list(task.test_docs() if split == "test" else task.validation_docs())
    assert len(docs) == count
    for doc in docs:
        choices = task.doc_to_choice(doc)
        gold = task.doc_to_target(doc) if name != "winogrande" else task.doc_to_text(doc)  # winogrande scores contexts
        assert n_choices is None and 3 <= len(choices) <= 5 or len(choices) == n_choices
        assert isinstance(gold, int) and 0 <= gold < len(choices), (name, doc)
        assert all(isinstance(c, str) and c for c in choices)


def _fields(path):
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node).split(".")[-1])
    config = yaml.load(path.read_text(), Loader=Loader)
    if "include" in config:
        config = {**_fields(path.parent / config.pop("include")), **config}
    return config


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_prompts_choices_and_metrics_are_lm_evals_own(name):
    builtin_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    builtin = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
               "winogrande": "winogrande/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml"}[name]
    theirs, ours = _fields(Path(builtin_dir) / builtin), _fields(TASK_DIR / f"{name}.yaml")
    for field in PROMPT_FIELDS:
        mine = ours.get(field)
        if isinstance(mine, str) and mine.startswith("!function "):  # a wrapper that calls lm-eval's function
            mine = "!function " + mine.split(" ")[1].removeprefix(f"{name}_")
        assert mine == theirs.get(field), f"{name}.{field}: {mine!r} != lm-eval's {theirs.get(field)!r}"
    split = EXPECTED[name][0]
    assert ours[f"{split}_split"] == theirs[f"{split}_split"] == split


def test_hellaswag_queries_follow_lm_evals_processing(tasks):
    spec = importlib.util.spec_from_file_location("offline_data", TASK_DIR / "offline_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    split_context = module.split_context
    assert split_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_context("A lady walks to a barbell. She bends down and grabs the pole. the lady") == (
        "A lady walks to a barbell. She bends down and grabs the pole.", "the lady")
    assert split_context("[header] How to dry a rug. [step] Hang it outside.") == (
        "[header] How to dry a rug. [step] Hang it outside.", "")
    assert split_context("two men") == ("", "two men")
    assert split_context('A title appears. a man named " bob "') == ("A title appears.", 'a man named " bob "')
    assert split_context('He says "stop!"') == ('He says "stop!"', "")
    doc = next(iter(tasks["hellaswag"].validation_docs()))
    raw = bz2.decompress((DATA / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes()).decode().split("\n")
    assert raw[0] == "Roof shingle removal: A man is sitting on a roof. he" and raw[1] == "3"
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"  # lm-eval capitalizes ctx_b
    assert doc["choices"] == raw[2:6] and tasks["hellaswag"].doc_to_target(doc) == 3
    # HellaSwag's validation set has 3243 ActivityNet items (1809 in-domain + 1434 zero-shot), each
    # with a ctx_b, then 6799 WikiHow items, with none; the split must find exactly that.
    rows = module.hellaswag(DATA)["validation"]
    assert [i for i, b in enumerate(rows["ctx_b"]) if b] == list(range(3243))
