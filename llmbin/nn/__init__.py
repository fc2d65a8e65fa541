from .binary_linear import BinaryLinear

__all__ = ["BinaryLinear"]
