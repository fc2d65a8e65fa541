"""User-facing errors: each message names the problem and the fix, on one line."""


class LlmbinError(Exception):
    """An error caused by the user's input, reported without a traceback by the CLI."""
