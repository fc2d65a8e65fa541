"""``python -m llmbin``, as launchers run it: ``torchrun --nproc-per-node N -m llmbin quantize ...``."""
import sys

from .cli import main

sys.exit(main())
