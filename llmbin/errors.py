"""User-facing errors: each message names the problem and the fix, on one line."""


class LlmbinError(Exception):
    """An error caused by the user's input, reported without a traceback by the CLI."""


class QuantizationStopped(Exception):
    """Raised when a run stops after the blocks it was asked to quantize (``stop_after_blocks``);
    its finished blocks are on disk, and the same run without the limit resumes from them."""

    def __init__(self, blocks_done: int):
        super().__init__(f"stopped after {blocks_done} newly quantized blocks, as asked")
        self.blocks_done = blocks_done
