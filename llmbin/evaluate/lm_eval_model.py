"""``--model llmbin`` for lm-eval: its ``hf`` model, data-parallel on CPUs too.

Under ``accelerate launch``, lm-eval's ``HFLM`` splits the requests over the processes only when
the machine has GPUs; on CPUs every process scored every request, so N processes did the work of
one, N times. This subclass takes the rank and world size from the launcher whatever the device;
lm-eval's evaluator then shards the requests and gathers the results as it does on GPUs. With
one process it is ``hf`` exactly.
"""
from __future__ import annotations

_REGISTERED = False


def register() -> None:
    """Register ``llmbin`` in lm-eval's model registry (once; lm-eval needs to be installed)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model("llmbin")
    class LlmbinLM(HFLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            accelerator = getattr(self, "accelerator", None)  # HFLM keeps it only when launched with several processes
            if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
                self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    _REGISTERED = True
