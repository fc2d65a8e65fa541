"""``python -m llmbin.lm_eval ARGS``: lm-evaluation-harness's own command line (``lm_eval ARGS``),
run with llmbin imported so that ``--model hf --model_args pretrained=CHECKPOINT`` loads a
packed checkpoint through transformers. Every option is lm-eval's; nothing is re-implemented."""
from __future__ import annotations

from .checkpoint.hf_quantizer import register

register()  # the "llmbin" quantizer, so that transformers loads packed checkpoints


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("llmbin: error: this needs lm-evaluation-harness: pip install 'llmbin[eval]'") from None
    cli_evaluate()


if __name__ == "__main__":
    main()
