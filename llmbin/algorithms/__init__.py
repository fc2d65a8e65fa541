"""Numeric algorithms as pure tensor functions. Importing this package registers every method."""
from . import pbllm  # noqa: F401
