"""Numeric algorithms as pure tensor functions. Importing this package registers every method."""
from . import billm, dbllm, pbllm, rtn, uniform  # noqa: F401
