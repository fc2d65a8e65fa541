"""``dataset_perplexity``: the public perplexity of a data set or text file (the CLI and eval scripts use it)."""
import torch

from llmbin.data.text import resolve_text
from llmbin.evaluate.perplexity import dataset_perplexity, perplexity
from tests.conftest import tiny_model


def test_it_is_the_perplexity_of_the_tokenized_test_text(text_file, tokenizer):
    model = tiny_model()
    ids = tokenizer(resolve_text(str(text_file), "test"), return_tensors="pt").input_ids[0]
    expected = perplexity(model, ids, 32, 3, progress=False)
    assert dataset_perplexity(model, tokenizer, str(text_file), seqlen=32, max_windows=3, progress=False) == expected
    # a standard data set's name with its text in a local file: the file is read
    assert dataset_perplexity(model, tokenizer, "wikitext2", eval_data=str(text_file), seqlen=32, max_windows=3,
                              progress=False) == expected
    assert torch.isfinite(torch.tensor(expected))
