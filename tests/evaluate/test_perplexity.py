"""Perplexity refuses what it cannot measure: windows past the model's positions, non-finite outputs."""
import math

import pytest
import torch

from llmbin.errors import LlmbinError
from llmbin.evaluate.perplexity import perplexity
from tests.conftest import tiny_model

IDS = torch.randint(0, 300, (1200,), generator=torch.Generator().manual_seed(0))


def test_perplexity_of_a_random_model_is_near_the_vocabulary_size():
    ppl = perplexity(tiny_model(), IDS, seqlen=200, progress=False)
    assert math.isfinite(ppl) and 100 < ppl < 1000  # vocabulary 300, random weights


def test_windows_longer_than_the_models_positions_are_refused():
    with pytest.raises(LlmbinError, match=r"^--seqlen 300 is longer than the model's 256 positions "
                                          r"\(max_position_embeddings\); use --seqlen 256 or less$"):
        perplexity(tiny_model(), IDS, seqlen=300, progress=False)


def test_non_finite_outputs_are_an_error_not_a_nan_perplexity():
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(LlmbinError, match="outputs are NaN or infinite"):
        perplexity(model, IDS, seqlen=200, progress=False)


def test_token_ids_past_the_embedding_are_refused():
    ids = IDS.clone()
    ids[5] = 300
    with pytest.raises(LlmbinError, match="token id 300, but the model's embedding has 300 rows; the tokenizer does not"):
        perplexity(tiny_model(), ids, seqlen=200, progress=False)
