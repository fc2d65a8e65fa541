"""The registry maps every method's config class to its function, and nothing else."""
from llmbin.config import available_methods, method_configs
from llmbin.registry import FUNCTIONS


def test_every_method_config_has_a_function_and_every_function_a_method():
    assert set(FUNCTIONS) == set(method_configs())
    assert available_methods() == sorted(cls.method for cls in FUNCTIONS)
