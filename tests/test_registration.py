"""``import llmbin`` registers the quantizer with transformers whichever is imported first, without
importing transformers itself."""
import subprocess
import sys

import pytest
import torch

from tests.conftest import packed_checkpoint, tiny_model

MAPPING = "import transformers.quantizers.auto as auto\nprint(auto.AUTO_QUANTIZER_MAPPING.get('llmbin').__name__)"


def _run(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    calibration = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(0))
    return packed_checkpoint(tiny_model("llama"), calibration, tmp_path_factory.mktemp("ckpt") / "llama", tokenizer)[1]


def test_import_llmbin_then_from_pretrained_loads_a_packed_checkpoint(checkpoint):
    code = (f"import sys, llmbin\nassert 'transformers' not in sys.modules\n"
            f"from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})\n"
            f"print(sorted({{type(m).__name__ for m in model.model.layers.modules()}} & {{'BinaryLinear', 'Linear'}}))")
    assert _run(code) == "['BinaryLinear']"


@pytest.mark.parametrize("first", [
    "import transformers.quantizers\nimport llmbin",  # transformers' quantizers first: registered at once
    "from transformers import AutoModelForCausalLM\nimport llmbin",
    "import llmbin",  # then transformers' quantizers load: registered when they have
    "import llmbin.checkpoint.io",  # the quantizer module first, which imports transformers' quantizers itself
])
def test_the_quantizer_is_registered_whatever_is_imported_first(first):
    assert _run(f"{first}\n{MAPPING}") == "LlmbinHfQuantizer"


def test_a_failed_registration_warns_and_leaves_transformers_usable(monkeypatch):
    import warnings

    from llmbin import registration

    def broken():
        raise ImportError("no torch here")

    monkeypatch.setattr(registration, "register_now", broken)
    ran = []
    wrapped = registration._then_register(lambda module: ran.append(module))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped("module")
    assert ran == ["module"] and "could not register its quantizer" in str(caught[0].message)
