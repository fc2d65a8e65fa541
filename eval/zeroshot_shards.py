"""Zero-shot evaluation in shards of documents, merged into the numbers one lm-eval run reports.

Why: the five tasks are 60566 requests per model, hours on a CPU. A shard (documents
``[start, end)`` of one task) is scored by ``zero_shot(docs=...)`` and saved as a small JSON of
lm-eval's per-document metrics, so finished shards outlive an interrupted run or a machine that
is not kept. ``merge`` rebuilds each task's metrics from them with the task's own lm-eval
aggregation and stderr functions, over the documents in lm-eval's order: the values one run over
all documents gives. Shards of different weights (``model_sha256``) never merge.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from llmbin.errors import LlmbinError
from llmbin.evaluate.zeroshot import prepare_tasks, zero_shot

FORMAT = 1  # version of the shard JSON below


def load_tasks(tasks: list[str], task_data: str | os.PathLike | None = None) -> dict:
    """lm-eval's Task objects (documents and aggregation functions), checked as ``zero_shot`` checks them."""
    _, manager = prepare_tasks(list(tasks), task_data=task_data)
    loaded = manager.load(list(tasks))["tasks"]
    return {t: loaded[t] for t in tasks}


def plan(sizes: dict[str, int], shard_docs: int) -> list[tuple[str, int, int]]:
    """(task, start, end) for every shard: consecutive runs of ``shard_docs`` documents."""
    if shard_docs < 1:
        raise LlmbinError(f"a shard needs at least 1 document, not {shard_docs}")
    return [(t, s, min(s + shard_docs, n)) for t, n in sizes.items() for s in range(0, n, shard_docs)]


def shard_path(folder: str | os.PathLike, task: str, start: int, end: int) -> Path:
    return Path(folder) / f"{task}-{start:05d}-{end:05d}.json"


def model_sha256(model) -> str:
    """A digest of every tensor in the state dict (names, dtypes, shapes, bytes): shards of a
    re-created checkpoint merge only if it has the same weights, bit for bit.

    Packed sign planes are named by their ``PackedWeight`` field, ``planes``, not by their stored
    name (``weight`` since format version 3), so that rename left earlier digests valid."""
    import torch

    from llmbin.nn.binary_linear import BinaryLinear
    from llmbin.packing.packed_weight import PLANES_NAME

    planes = {f"{name}.{PLANES_NAME}" for name, m in model.named_modules() if isinstance(m, BinaryLinear)}
    state = {(k.removesuffix(PLANES_NAME) + "planes" if k in planes else k): v for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_shard(model, tokenizer, task: str, start: int, end: int, *, sha256: str, batch_size: int = 8,
              task_data: str | os.PathLike | None = None, cache: str | os.PathLike | None = None) -> dict:
    """Score documents ``[start, end)`` of ``task``; returns the shard record ``save_shard`` writes."""
    began = time.perf_counter()
    report = zero_shot(model, tokenizer, [task], batch_size=batch_size, task_data=task_data, cache=cache,
                       docs={task: list(range(start, end))})
    return {"format": FORMAT, "task": task, "start": start, "end": end, "model_sha256": sha256,
            "batch_size": batch_size, "task_data": report["task_data"],
            "seconds": round(time.perf_counter() - began, 1), "machine": _machine(), "docs": report["docs"][task]}


def save_shard(shard: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(shard) + "\n")
    os.replace(tmp, path)  # a shard file is complete or absent


def load_shards(folder: str | os.PathLike) -> list[dict]:
    shards = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            shard = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LlmbinError(f"shard {path} is not valid JSON ({exc}); delete it and rerun to score it again") from None
        if not isinstance(shard, dict) or shard.get("format") != FORMAT:
            raise LlmbinError(f"{path} is not a format-{FORMAT} zero-shot shard; delete it or move it out of {folder}")
        shards.append(shard)
    return shards


def merge(shards: list[dict], tasks: dict, bootstrap_iters: int = 100000) -> dict:
    """Each task's metrics from its shards: ``{"tasks": {task: {metric: value}}, "stderr": {...},
    "average": mean acc (None until every task is complete), "scored": {task: [documents scored,
    documents in the task]}}``. Tasks not yet complete have no metrics."""
    from lm_eval.api.metrics import mean, stderr_for_metric

    digests = {s["model_sha256"] for s in shards}
    if len(digests) > 1:
        raise LlmbinError(f"the shards come from {len(digests)} different models (model_sha256); "
                          "keep one model's shards per folder")
    values, errors, scored = {}, {}, {}
    for task, task_obj in tasks.items():
        n = len(task_obj.eval_docs)
        per_doc: dict[int, dict] = {}
        for s in (s for s in shards if s["task"] == task):
            docs = s["docs"]
            for i, doc_id in enumerate(docs["doc_id"]):
                if doc_id in per_doc or not 0 <= doc_id < n:
                    raise LlmbinError(f"{task} document {doc_id} is in two shards or out of range (0..{n - 1}); "
                                      "remove the overlapping shard")
                per_doc[doc_id] = {m: v[i] for m, v in docs.items() if m != "doc_id"}
        scored[task] = [len(per_doc), n]
        if len(per_doc) < n:
            continue
        values[task], errors[task] = {}, {}
        aggregation = task_obj.aggregation()
        for metric in per_doc[0]:
            items = [per_doc[i][metric] for i in range(n)]  # lm-eval's order: by document
            agg = aggregation.get(metric, mean)
            values[task][metric] = float(agg(items))
            stderr = stderr_for_metric(metric=agg, bootstrap_iters=bootstrap_iters)
            errors[task][metric] = float(stderr(items)) if stderr and n > 1 else None
    complete = len(values) == len(tasks)
    accs = [v["acc"] for v in values.values() if "acc" in v]
    return {"tasks": values, "stderr": errors, "average": sum(accs) / len(accs) if complete and accs else None,
            "scored": scored, "model_sha256": digests.pop() if digests else None}


def _machine() -> dict:
    from importlib.metadata import version

    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": version("lm_eval"), "threads": torch.get_num_threads()}


__all__ = ["FORMAT", "load_tasks", "plan", "shard_path", "model_sha256", "run_shard", "save_shard", "load_shards",
           "merge"]
