"""``llmbin.quantize``: quantize a loaded model in place with one method config."""
from __future__ import annotations

import copy

import torch

from . import __version__
from .bits import bit_report
from .checkpoint import STORAGE_DTYPE, round_to_storage
from .config import QuantConfig
from .distill import deviation_aware_distill
from .driver import quantize_blocks
from .errors import LlmbinError
from .nn.half_weights import serve_half_weights
from .packing.packed_weight import FORMAT_VERSION
from .resume import BlockStore


def quantize(
    model: torch.nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    work_dir: str | None = None,
    calibration_info: dict | None = None,
) -> torch.nn.Module:
    """Replace every linear layer in the decoder blocks with a packed ``BinaryLinear``.

    ``calibration`` is a ``(nsamples, seqlen)`` tensor of token ids. With ``work_dir``,
    each finished block is saved there and a rerun with the same options resumes.
    Methods that ask for it (``db-llm --distill``) then distill the scales and norms against a
    copy of the float model taken before quantization. Afterwards the remaining float tensors
    are rounded to the checkpoint's fp16, so the returned model computes exactly what its
    saved checkpoint will (and, like a loaded one, serves its fp32 lm_head from those fp16 values).
    """
    config.validate()
    if not torch.is_tensor(calibration) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise LlmbinError("calibration must be a (nsamples, seqlen) LongTensor of token ids; see llmbin.calibration_windows")
    done, on_block_done = {}, None
    if work_dir is not None:
        fingerprint = {"config": config.to_dict(), "calibration": calibration_info or {},
                       "shape": list(calibration.shape), "checksum": int(calibration.sum())}
        store = BlockStore(work_dir, fingerprint)
        done, on_block_done = store.load(), store.save
    teacher, distill_report = (copy.deepcopy(model) if config.wants_distillation() else None), {}
    quantize_blocks(model, config, calibration, device=device, done=done, on_block_done=on_block_done, progress=progress)
    if teacher is not None:
        losses = deviation_aware_distill(model, teacher.to(device), calibration, epochs=config.distill_epochs,
                                         lr=config.distill_lr, progress=progress)
        del teacher
        distill_report = {"distill_loss_first": losses[0], "distill_loss_last": losses[-1]}
    round_to_storage(model)
    serve_half_weights(model, STORAGE_DTYPE)  # as load() does, so the two compute alike
    model.config.quantization_config = {
        "quant_method": "llmbin",
        "format_version": FORMAT_VERSION,
        "llmbin_version": __version__,
        **config.to_dict(),
        "calibration": calibration_info or {"nsamples": calibration.shape[0], "seqlen": calibration.shape[1]},
        "bits_per_weight": bit_report(model)["bits_per_weight"],
        **distill_report,
    }
    return model
