"""Zero-shot shards: scored separately, saved, reloaded and merged, they give the numbers one
lm-eval run over the same documents gives."""
import json
from types import SimpleNamespace

import pytest
import torch
import zeroshot_shards as shards

from llmbin.errors import LlmbinError
from llmbin.evaluate.zeroshot import zero_shot
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def piqa():
    return shards.load_tasks(["piqa"])["piqa"]


def first_docs(task, n):
    """The task seen as if it had only its first n documents (what lm-eval's --limit n scores)."""
    return SimpleNamespace(eval_docs=range(n), aggregation=task.aggregation)


def test_shards_merge_to_the_numbers_of_one_run(tokenizer, tmp_path, piqa):
    model = tiny_model("llama", seed=3)
    sha = shards.model_sha256(model)
    for start, end in [(0, 2), (2, 7)]:  # unequal shards, saved and reloaded
        shard = shards.run_shard(model, tokenizer, "piqa", start, end, sha256=sha, batch_size=3)
        assert shard["docs"]["doc_id"] == list(range(start, end))
        shards.save_shard(shard, shards.shard_path(tmp_path, "piqa", start, end))
    merged = shards.merge(shards.load_shards(tmp_path), {"piqa": first_docs(piqa, 7)})
    one_run = zero_shot(model, tokenizer, ["piqa"], limit=7, batch_size=3)
    assert merged["tasks"] == one_run["tasks"] and merged["stderr"] == one_run["stderr"]
    assert merged["scored"] == {"piqa": [7, 7]} and merged["average"] == one_run["average"]
    assert 0 < merged["stderr"]["piqa"]["acc"] < 1  # lm-eval's stderr, not a placeholder


def test_per_document_metrics_do_not_depend_on_the_other_documents(tokenizer):
    model = tiny_model("llama", seed=3)
    both = zero_shot(model, tokenizer, ["piqa", "winogrande"], docs={"piqa": [5, 1, 3], "winogrande": [0, 2]})
    alone = zero_shot(model, tokenizer, ["piqa"], docs={"piqa": [3]})
    assert both["docs"]["piqa"]["doc_id"] == [1, 3, 5] and both["docs"]["winogrande"]["doc_id"] == [0, 2]
    assert set(both["docs"]["piqa"]) == {"doc_id", "acc", "acc_norm"}
    assert alone["docs"]["piqa"]["acc"] == both["docs"]["piqa"]["acc"][1:2]


def test_an_incomplete_task_reports_what_is_scored_and_no_metrics(piqa):
    shard = {"format": 1, "task": "piqa", "model_sha256": "a", "docs": {"doc_id": [0, 1], "acc": [1.0, 0.0]}}
    merged = shards.merge([shard], {"piqa": first_docs(piqa, 5)})
    assert merged["scored"] == {"piqa": [2, 5]} and merged["tasks"] == {} and merged["average"] is None


def test_shards_of_other_weights_or_overlapping_documents_do_not_merge(piqa):
    a = {"format": 1, "task": "piqa", "model_sha256": "a", "docs": {"doc_id": [0, 1], "acc": [1.0, 0.0]}}
    with pytest.raises(LlmbinError, match="come from 2 different models"):
        shards.merge([a, {**a, "model_sha256": "b"}], {"piqa": first_docs(piqa, 2)})
    with pytest.raises(LlmbinError, match="piqa document 1 is in two shards"):
        shards.merge([a, {**a, "docs": {"doc_id": [1], "acc": [1.0]}}], {"piqa": first_docs(piqa, 2)})


def test_the_plan_covers_every_document_once():
    plan = shards.plan({"piqa": 1838, "winogrande": 1000}, 1000)
    assert plan == [("piqa", 0, 1000), ("piqa", 1000, 1838), ("winogrande", 0, 1000)]
    with pytest.raises(LlmbinError, match="at least 1 document"):
        shards.plan({"piqa": 10}, 0)


def test_the_model_digest_sees_a_single_changed_weight():
    model = tiny_model("llama", seed=3)
    before = shards.model_sha256(model)
    assert shards.model_sha256(tiny_model("llama", seed=3)) == before
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[5, 7] += 1e-3
    assert shards.model_sha256(model) != before


def test_the_digest_of_a_packed_model_names_its_planes_as_format_2_did():
    import hashlib

    import llmbin
    from llmbin.nn.binary_linear import BinaryLinear

    model = llmbin.quantize(tiny_model("llama"), llmbin.make_config("rtn-sign"), torch.zeros(1, 8, dtype=torch.long),
                            progress=False)
    packed = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BinaryLinear)}
    digest = hashlib.sha256()  # the digest as computed before format 3 stored the planes as "weight"
    for name, t in sorted((k[:-len("weight")] + "planes" if k in packed else k, v) for k, v in model.state_dict().items()):
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.contiguous().reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    assert packed and shards.model_sha256(model) == digest.hexdigest()


def test_a_broken_or_foreign_shard_file_is_a_clear_error(tmp_path):
    (tmp_path / "piqa-00000-00010.json").write_text('{"task": "piqa", "do')
    with pytest.raises(LlmbinError, match="is not valid JSON .*delete it and rerun"):
        shards.load_shards(tmp_path)
    (tmp_path / "piqa-00000-00010.json").write_text(json.dumps({"results": {}}))
    with pytest.raises(LlmbinError, match="is not a format-1 zero-shot shard"):
        shards.load_shards(tmp_path)


def test_docs_and_limit_are_exclusive_and_docs_must_cover_the_tasks(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(LlmbinError, match="either limit or docs"):
        zero_shot(model, tokenizer, ["piqa"], limit=2, docs={"piqa": [0]})
    with pytest.raises(LlmbinError, match="docs must list document indices for each of the tasks piqa, winogrande"):
        zero_shot(model, tokenizer, ["piqa", "winogrande"], docs={"piqa": [0]})
