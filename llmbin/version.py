"""The package version, apart from ``llmbin/__init__`` so that modules can read it without importing the package."""

__version__ = "0.1.0"
