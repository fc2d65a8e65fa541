"""User-facing errors: each message names the problem and the fix, on one line."""
import errno
import os
import stat


class LlmbinError(Exception):
    """An error caused by the user's input, reported without a traceback by the CLI."""


class QuantizationStopped(Exception):
    """Raised when a run stops after the blocks it was asked to quantize (``stop_after_blocks``);
    its finished blocks are on disk, and the same run without the limit resumes from them."""

    def __init__(self, blocks_done: int):
        super().__init__(f"stopped after {blocks_done} newly quantized block{'s' * (blocks_done != 1)}, as asked")
        self.blocks_done = blocks_done


def check_token_ids(model, ids) -> None:
    """Refuse token ids past the model's embedding rows: a tokenizer that does not belong to the
    model (or a model folder with a foreign tokenizer) would fail with an index error deep inside."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = int(ids.max()) if ids.numel() else -1
    if top >= rows:
        raise LlmbinError(f"the tokenizer produced token id {top}, but the model's embedding has {rows} rows; the "
                          "tokenizer does not belong to this model, use the model's own tokenizer")


def check_positions(config, seqlen: int, option: str = "--seqlen") -> None:
    """Refuse windows longer than the model was trained for (``max_position_embeddings``): models
    with learned positions fail with an index error, rotary ones give numbers that mean nothing."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise LlmbinError(f"{option} {seqlen} is longer than the model's {limit} positions (max_position_embeddings); "
                          f"use {option} {limit} or less")


def missing_path(path: "str | os.PathLike", want: str = "file") -> str | None:
    """Why ``path`` is not the ``want`` ("file" or "folder") the user meant, in words, or None when it
    is one: it does not exist, is the other kind, is a link to nothing, a loop of links, or (for a file)
    a pipe, socket or device."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        if os.path.islink(path):
            return f"is a link to {os.readlink(path)}, which does not exist"
        return "does not exist"
    if want == "file" and stat.S_ISDIR(mode):
        return "is a folder"
    if want == "file" and not stat.S_ISREG(mode):  # a pipe would block the read forever, /dev/zero fill memory
        return "is not a regular file (a pipe, socket or device)"
    if want == "folder" and not stat.S_ISDIR(mode):
        return "is a file, not a folder"
    return None
