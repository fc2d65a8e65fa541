"""``python -m llmbin.lm_eval ARGS``: lm-evaluation-harness's own command line (``lm_eval ARGS``),
run with llmbin imported so that ``--model hf --model_args pretrained=CHECKPOINT`` loads a
packed checkpoint through transformers. Every option is lm-eval's; nothing is re-implemented.
``--model llmbin`` is ``hf`` that is also data-parallel on CPUs under ``accelerate launch``
(``evaluate.lm_eval_model``)."""
from __future__ import annotations

import os

from .checkpoint.hf_quantizer import register

register()  # the "llmbin" quantizer, so that transformers loads packed checkpoints


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("llmbin: error: this needs lm-evaluation-harness: pip install 'llmbin[eval]'") from None
    from .distributed import launched_world
    from .evaluate.lm_eval_model import register as register_model

    if launched_world() > 1:
        import torch

        if not torch.cuda.is_available():  # accelerate's multi-CPU mode, which its launcher sets only with MPI
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    register_model()
    cli_evaluate()


if __name__ == "__main__":
    main()
