"""Method options: their record, and clear errors for values out of range."""
import pytest

import llmbin
from llmbin.config import config_from_dict
from llmbin.errors import LlmbinError


def test_an_option_added_later_records_nothing_at_its_default():
    # DB-LLM FDB checkpoints and unfinished runs written before ``planes`` existed keep their record
    # (and so their resume fingerprint); a changed value is recorded and read back
    assert "planes" not in llmbin.make_config("db-llm").to_dict()
    one = llmbin.make_config("db-llm", planes=1, group_size=64).to_dict()
    assert one["planes"] == 1
    assert config_from_dict(one).to_dict() == one
    assert config_from_dict(llmbin.make_config("db-llm").to_dict()).planes == 2


@pytest.mark.parametrize("planes", [0, 5])
def test_planes_out_of_range_is_refused(planes):
    with pytest.raises(LlmbinError, match="--planes must be 1 to 4"):
        llmbin.make_config("db-llm", planes=planes)
