"""Zero-shot accuracy through lm-evaluation-harness: any loaded model (packed layers and kernels
included) wrapped in lm-eval's ``HFLM`` and scored by ``simple_evaluate``; no task's scoring is
re-implemented here.

Task data comes from the hub, or from local copies: ``task_data`` (``--task-data``), else
``$LLMBIN_TASK_DATA``, else ``zeroshot/`` in the local data folder (``$LLMBIN_DATA``). Local
copies run the task definitions in ``llmbin/evaluate/tasks/``: lm-eval's own prompts, choices and
metrics over loaders that rebuild the hub's fields (see ``tasks/offline_data.py``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..data.paths import local_data_dir
from ..errors import LlmbinError

OFFLINE_TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag")
DEFAULT_TASKS = OFFLINE_TASKS
TASK_DATA_ENV = "LLMBIN_TASK_DATA"
TASK_DIR = Path(__file__).with_name("tasks")  # lm-eval task definitions over the local copies


def resolve_task_data(task_data: str | os.PathLike | None) -> Path | None:
    """The local task data folder to use, or None for the hub."""
    chosen = task_data or os.environ.get(TASK_DATA_ENV)
    if chosen:
        path = Path(chosen)
        if not path.is_dir():
            source = "--task-data" if task_data else f"${TASK_DATA_ENV}"
            raise LlmbinError(f"{source} {path} is not a folder; it should hold {', '.join(_folders())} "
                              f"(see llmbin/evaluate/tasks/offline_data.py)")
        return path
    root = local_data_dir()
    return root / "zeroshot" if root is not None and (root / "zeroshot").is_dir() else None


# The local files each offline task reads, relative to the task data folder.
TASK_FILES = {"piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"], "arc_easy": ["arc/ARC-Easy-Test.jsonl"],
              "arc_challenge": ["arc/ARC-Challenge-Test.jsonl"],
              "winogrande": ["winogrande/dev.jsonl", "winogrande/dev-labels.lst"],
              "hellaswag": ["hellaswag/hellaswag_val_full.txt.bz2"]}


def _folders() -> list[str]:
    return list(dict.fromkeys(f.split("/")[0] + "/" for files in TASK_FILES.values() for f in files))


def check_task_files(tasks: list[str], data: Path) -> None:
    missing = [f for t in tasks for f in TASK_FILES[t] if not (data / f).is_file()]
    if missing:
        raise LlmbinError(f"the task data folder {data} lacks {', '.join(missing)}; "
                          "it needs the layout that llmbin/evaluate/tasks/offline_data.py reads")


def task_manager(data: Path | None):
    from lm_eval.tasks import TaskManager

    if data is None:
        return TaskManager()
    # Only llmbin's definitions: the same task names, reading the local copies.
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(data)})


def check_tasks(tasks: list[str], manager, offline: bool) -> None:
    if not tasks:
        raise LlmbinError(f"--tasks is empty; available: {', '.join(OFFLINE_TASKS)}")
    known = OFFLINE_TASKS if offline else manager.all_tasks
    unknown = [t for t in tasks if t not in known]
    if unknown:
        if offline:
            raise LlmbinError(f"unknown task {', '.join(unknown)} for local task data; available: {', '.join(OFFLINE_TASKS)}")
        close = sorted(t for t in known if any(u.split("_")[0] in t for u in unknown))[:10]
        raise LlmbinError(f"unknown task {', '.join(unknown)}; lm-eval has {len(known)} tasks"
                          + (f", e.g. {', '.join(close)}" if close else "") + " (lm-eval --tasks list shows them all)")


def prepare_tasks(tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                  task_data: str | os.PathLike | None = None):
    """Check the tasks and options before any model work; returns (local data folder or None,
    lm-eval TaskManager). ``llmbin quantize --eval-tasks`` calls it first, so a typo fails in
    seconds rather than after the quantization."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LlmbinError("zero-shot tasks need lm-evaluation-harness: pip install 'llmbin[eval]'") from None
    if limit is not None and limit < 1:
        raise LlmbinError(f"--limit must be at least 1, not {limit}")
    if batch_size < 1:
        raise LlmbinError(f"the lm-eval batch size must be at least 1, not {batch_size}")
    data = resolve_task_data(task_data)
    manager = task_manager(data)
    check_tasks(tasks, manager, offline=data is not None)
    if data is not None:
        check_task_files(tasks, data)
    return data, manager


def checkpoint_lm(path: str | os.PathLike, *, dtype=None, device: str = "cpu", device_map=None,
                  offload_folder: str | None = None, batch_size: int = 8):
    """lm-eval's ``HFLM`` built from a checkpoint's path, as ``lm_eval --model hf --model_args
    pretrained=PATH`` builds it: transformers loads it through llmbin's quantizer, and with a
    ``device_map`` lm-eval's own ``parallelize`` placement applies (blocks over GPUs, CPU, disk)."""
    from lm_eval.models.huggingface import HFLM

    from ..checkpoint.io import check_checkpoint, check_offload_folder, load_error, verify_tokenizer

    path = check_checkpoint(path)
    verify_tokenizer(path)  # lm-eval loads it from the folder
    check_offload_folder(offload_folder)
    try:
        return HFLM(pretrained=str(path), dtype=dtype, device=device, batch_size=batch_size,
                    parallelize=device_map is not None, device_map=device_map, offload_folder=offload_folder,
                    offload_buffers=True)  # the packed weights are buffers: offloaded with the rest
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise load_error(exc, path, device_map) from None


def check_cache(prefix: str | os.PathLike) -> None:
    """Refuse lm-eval cache files (``PREFIX_rank*.db``) that someone else could have written.

    lm-eval's cache is a SqliteDict, which unpickles what it reads: a crafted file runs code. So
    each existing file must be a regular file (not a link) owned by this user and writable by
    no one else, in a folder that others cannot write (unless it is sticky, like /tmp, where they
    cannot replace a file they do not own)."""
    import stat

    prefix = Path(prefix)
    folder = prefix.parent if str(prefix.parent) else Path(".")
    fix = "delete it or choose another --cache path"
    if folder.exists():
        mode = folder.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise LlmbinError(f"--cache folder {folder} is writable by every user, and lm-eval's cache runs the code a "
                              "crafted file holds; use a folder only you can write")
    for path in sorted(folder.glob(prefix.name + "_rank*.db")) if folder.exists() else ():
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            problem = "is a link" if stat.S_ISLNK(st.st_mode) else "is not a regular file"
        elif st.st_uid != os.getuid():
            problem = f"belongs to another user (uid {st.st_uid})"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = "is writable by other users"
        else:
            continue
        raise LlmbinError(f"cache file {path} {problem}; lm-eval's cache unpickles its contents, which runs any code a "
                          f"crafted file holds: {fix}")


def zero_shot(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
              task_data: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
              docs: dict[str, list[int]] | None = None) -> dict:
    """Run ``tasks`` with lm-eval on ``model`` (a model, or an ``HFLM`` such as :func:`checkpoint_lm`'s);
    returns ``{"tasks": {task: {metric: value}}, "stderr": {...}, "average": mean acc,
    "task_data": folder or None, "limit": limit}``. With ``cache`` (a path
    prefix), lm-eval keeps every scored request in SQLite there, so an interrupted run resumes.

    ``docs`` ({task: document indices}, instead of ``limit``) scores only those documents and adds
    ``"docs": {task: {"doc_id": [...], metric: [per-document value, ...]}}``, lm-eval's own
    per-document metrics, which ``llmbin.evaluate.shards`` merges across runs."""
    data, manager = prepare_tasks(tasks, limit=limit, batch_size=batch_size, task_data=task_data)
    if cache is not None:
        check_cache(cache)
    if docs is not None:
        docs = _check_docs(docs, tasks, limit)
    from lm_eval import simple_evaluate  # after prepare_tasks, which turns a missing lm-eval into a one-line error
    from lm_eval.models.huggingface import HFLM

    lm = model if isinstance(model, HFLM) else HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, samples=docs, task_manager=manager,
                              log_samples=docs is not None, use_cache=None if cache is None else str(cache))
    except Exception as exc:
        if type(exc).__name__ == "TaskDataError":  # a local file in the wrong format (offline_data.py)
            raise LlmbinError(str(exc)) from None
        raise
    values, errors = {}, {}
    for task in tasks:
        raw = out["results"][task]
        values[task] = {k.split(",")[0]: float(v) for k, v in raw.items()
                        if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        errors[task] = {k.split(",")[0][: -len("_stderr")]: _number(v) for k, v in raw.items()
                        if k.split(",")[0].endswith("_stderr")}
    accs = [v["acc"] for v in values.values() if "acc" in v]
    report = {"tasks": values, "stderr": errors, "average": sum(accs) / len(accs) if accs else None,
              "task_data": str(data) if data else None, "limit": limit}
    if docs is not None:
        report["docs"] = {task: _per_document(out["samples"][task]) for task in tasks}
    return report


def _check_docs(docs: dict[str, list[int]], tasks: list[str], limit: int | None) -> dict[str, list[int]]:
    if limit is not None:
        raise LlmbinError("give either limit or docs, not both")
    if set(docs) != set(tasks) or any(not docs[t] for t in tasks):
        raise LlmbinError(f"docs must list document indices for each of the tasks {', '.join(tasks)}")
    # lm-eval maps its n-th scored document to the n-th index, so they must come sorted and once each.
    return {t: sorted(set(int(i) for i in docs[t])) for t in tasks}


def _per_document(samples: list[dict]) -> dict[str, list]:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    return {"doc_id": [s["doc_id"] for s in samples],
            **{metric: [float(s[metric]) for s in samples] for metric in samples[0]["metrics"]}}


def _number(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def table(report: dict) -> str:
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metrics in report["tasks"].items():
        for metric, value in metrics.items():
            err = report["stderr"].get(task, {}).get(metric)
            lines.append(f"| {task} | {metric} | {value:.4f} | {'' if err is None else f'{err:.4f}'} |")
    if report["average"] is not None:
        lines.append(f"| average | acc | {report['average']:.4f} | |")
    return "\n".join(lines)
