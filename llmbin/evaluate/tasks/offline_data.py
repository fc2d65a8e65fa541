"""Local copies of the zero-shot data sets, read into the hub's schema so that lm-eval's own
prompts and scoring apply unchanged (the task YAMLs beside this file point here).

Every loader takes ``data_dir`` (the ``zeroshot/`` folder; lm-eval passes the task metadata)
and returns the split lm-eval's task evaluates, with the hub's field names and types:

* piqa: ``valid.jsonl`` + ``valid-labels.lst`` -> ``baber/piqa`` validation (goal, sol1, sol2, label).
* arc: ``ARC-{Easy,Challenge}-Test.jsonl`` (the original release) -> ``allenai/ai2_arc`` test
  (id, question, choices {text, label}, answerKey).
* winogrande: ``dev.jsonl`` + ``dev-labels.lst`` -> ``allenai/winogrande`` winogrande_xl
  validation (sentence, option1, option2, answer as "1"/"2").
* hellaswag: ``hellaswag_val_full.txt.bz2``, six lines per example (``activity_label: ctx``,
  gold index, four endings) -> ``Rowan/hellaswag`` validation. The text keeps ``ctx`` but not
  its split into ``ctx_a`` and ``ctx_b``, which lm-eval needs (it capitalizes ``ctx_b``); see
  :func:`split_context`.
"""
from __future__ import annotations

import bz2
import json
import os
import re
from pathlib import Path

import datasets

ENV = "LLMBIN_TASK_DATA"


class TaskDataError(ValueError):
    """A local task file is missing or not in the documented format."""


def _folder(data_dir: str | os.PathLike | None, sub: str) -> Path:
    root = data_dir or os.environ.get(ENV)
    if not root:
        raise TaskDataError(f"no local task data folder: pass --task-data DIR or set {ENV}")
    folder = Path(root) / sub
    if not folder.is_dir():
        raise TaskDataError(f"{folder} does not exist; the task data folder needs {sub}/ (see llmbin/evaluate/tasks/offline_data.py)")
    return folder


def _file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise TaskDataError(f"{path} is missing")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labels(path: Path, count: int) -> list[str]:
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(labels) != count:
        raise TaskDataError(f"{path} has {len(labels)} labels for {count} examples")
    return labels


def _split(name: str, rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)})


def piqa(data_dir=None, **_) -> datasets.DatasetDict:
    folder = _folder(data_dir, "piqa")
    docs = _jsonl(_file(folder, "valid.jsonl"))
    labels = _labels(_file(folder, "valid-labels.lst"), len(docs))
    return _split("validation", [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
                                 for d, y in zip(docs, labels)])


def _arc(data_dir, name: str) -> datasets.DatasetDict:
    docs = _jsonl(_file(_folder(data_dir, "arc"), f"ARC-{name}-Test.jsonl"))
    return _split("test", [{"id": d["id"], "question": d["question"]["stem"],
                            "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                                        "label": [c["label"] for c in d["question"]["choices"]]},
                            "answerKey": d["answerKey"]} for d in docs])


def arc_easy(data_dir=None, **_) -> datasets.DatasetDict:
    return _arc(data_dir, "Easy")


def arc_challenge(data_dir=None, **_) -> datasets.DatasetDict:
    return _arc(data_dir, "Challenge")


def winogrande(data_dir=None, **_) -> datasets.DatasetDict:
    folder = _folder(data_dir, "winogrande")
    docs = _jsonl(_file(folder, "dev.jsonl"))
    labels = _labels(_file(folder, "dev-labels.lst"), len(docs))
    for d, y in zip(docs, labels):
        if d.get("answer", y) != y:
            raise TaskDataError(f"winogrande {d.get('qID')}: answer {d['answer']} in dev.jsonl but {y} in dev-labels.lst")
    return _split("validation", [{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": y}
                                 for d, y in zip(docs, labels)])


# A sentence end (punctuation, then any closing quotes or brackets) inside ctx, and at its end.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")
_ENDS_A_SENTENCE = re.compile(r"[.!?][\"')\]]*$")


def split_context(ctx: str) -> tuple[str, str]:
    """``ctx`` -> (``ctx_a``, ``ctx_b``). HellaSwag's ``ctx`` is ``ctx_a + " " + ctx_b`` when
    ``ctx_b`` (an incomplete noun phrase, ActivityNet items) is non-empty, else ``ctx_a``. So a
    context that ends a sentence has no ``ctx_b``; otherwise ``ctx_b`` is what follows the last
    sentence end (all of it if there is none). On the validation set this gives a ``ctx_b`` to
    exactly the 3243 ActivityNet items and to none of the 6799 WikiHow ones."""
    ctx = ctx.strip()
    if not ctx or _ENDS_A_SENTENCE.search(ctx):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return "", ctx
    cut = ends[-1].end()
    return ctx[:cut].rstrip(), ctx[cut:]


def hellaswag(data_dir=None, **_) -> datasets.DatasetDict:
    path = _file(_folder(data_dir, "hellaswag"), "hellaswag_val_full.txt.bz2")
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(f"{path}: {len(lines)} lines, not six per example")
    rows = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2: i + 6]
        label, sep, ctx = head.partition(": ")
        if not sep or gold not in ("0", "1", "2", "3"):
            raise TaskDataError(f"{path}: example {i // 6} is not 'activity_label: context' then a gold index 0-3")
        ctx_a, ctx_b = split_context(ctx)
        rows.append({"ind": i // 6, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "endings": endings, "label": gold})
    return _split("validation", rows)


def hellaswag_process_docs(dataset):
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


def winogrande_doc_to_text(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text

    return doc_to_text(doc)


def winogrande_doc_to_target(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target

    return doc_to_target(doc)


def winogrande_doc_to_choice(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice

    return doc_to_choice(doc)
