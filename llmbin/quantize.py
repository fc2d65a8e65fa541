"""``llmbin.quantize``: quantize a model with one method config, in memory or streamed from its shards."""
from __future__ import annotations

import copy
import os
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path

import torch

from . import distributed
from .bits import bit_report
from .checkpoint.digests import tensor_digest
from .checkpoint.folder import claim_output, release_output
from .checkpoint.hf_quantizer import mark_quantized
from .checkpoint.io import round_to_storage, save
from .checkpoint.resume import BlockStore, block_tensors, finished_blocks, modules_from_tensors
from .checkpoint.shards import MAX_SHARD_BYTES
from .checkpoint.tensors import STORAGE_DTYPE
from .config import QuantConfig
from .distill import distillation_stage
from .driver import float_dtype, module_name, onload_packed_model, quantize_blocks
from .e2e_tuning import final_norm, final_states, tune_end_to_end
from .errors import LlmbinError, check_positions, check_token_ids
from .models import OpenedModel, activation_dtype, decoder_layers
from .nn.half_weights import serve_half_weights
from .nn.table_weights import quantize_tables, table_modules
from .packing.packed_weight import FORMAT_VERSION, TABLE_VERSION
from .version import __version__


def run_options(config: QuantConfig, calibration_info: dict | None) -> dict:
    """The part of a run's resume fingerprint known before the model loads."""
    return {"config": config.to_dict(), "calibration": calibration_info or {}, "llmbin_version": __version__,
            "format_version": FORMAT_VERSION}


def format_version(model: torch.nn.Module) -> int:
    """The lowest format version that describes ``model``'s checkpoint: tables need version 6."""
    return TABLE_VERSION if table_modules(model) else FORMAT_VERSION


def resume_note(done: int, total: int, work_dir: str | os.PathLike) -> str:
    """The line a resumed run prints: the finished blocks it keeps (always 0 to done-1) and where it goes on."""
    blocks = f"block 0 of {total} is" if done == 1 else f"blocks 0-{done - 1} of {total} are"
    rest = f"continuing at block {done}" if done < total else "writing the checkpoint"
    return f"resuming: {blocks} done in {work_dir}; {rest}"


class SharedBlocks(Mapping):
    """Under torch.distributed: rank 0's finished blocks (``blocks``), each sent to every rank when the
    driver asks for it (all ranks ask in the same order). Other ranks pass None."""

    def __init__(self, blocks: Mapping[int, dict] | None, ranks: distributed.Ranks):
        self.blocks, self.ranks = blocks, ranks
        self.count = distributed.broadcast_value(len(blocks) if ranks.writer else None, 0, ranks)

    def __getitem__(self, index: int) -> dict:
        if index not in self:
            raise KeyError(index)
        state = self.blocks[index] if self.ranks.writer else None
        tensors, layers = block_tensors(state) if self.ranks.writer else (None, None)
        tensors, info = distributed.broadcast(tensors, {"layers": layers} if self.ranks.writer else None, 0, self.ranks,
                                              "cpu")
        return state if self.ranks.writer else {**modules_from_tensors(tensors, info["layers"]), **tensors}

    def __contains__(self, index) -> bool:
        return isinstance(index, int) and 0 <= index < self.count

    def __iter__(self):
        return iter(range(self.count))

    def __len__(self) -> int:
        return self.count


FINITE_CHUNK = 1 << 24  # elements checked for NaN/inf at a time (bounds the temporary mask)


def check_source(model: torch.nn.Module, weights: Mapping[str, torch.Tensor] | None = None, progress: bool = False) -> str:
    """One pass over every tensor of the source model before any other work: a NaN or infinite
    value anywhere (embedding, norms, head, not only the linears) is refused by name. Returns a
    digest of all of them: the model's identity in the resume fingerprint. ``weights`` (a streamed
    model's stored tensors) are read one at a time."""
    import xxhash
    from tqdm.auto import tqdm

    state = model.state_dict() if weights is None else None
    names = list(weights if weights is not None else state)  # state-dict order: a tied weight is named by its owner
    identity, seen = xxhash.xxh3_128(), set()
    for name in tqdm(names, desc="checking weights", unit="tensor", disable=not progress or len(names) < 1000):
        tensor = weights[name] if weights is not None else state[name]
        if tensor.is_meta or (weights is None and id(tensor) in seen):
            continue
        seen.add(id(tensor))
        if tensor.is_floating_point():
            flat = tensor.detach().reshape(-1)
            if not all(bool(torch.isfinite(part).all()) for part in flat.split(FINITE_CHUNK)):
                raise LlmbinError(f"{name} has NaN or infinite values; the model file is corrupt, re-download it")
        identity.update(f"{name}:{tensor_digest(name, tensor)};".encode())
    return identity.hexdigest()


def end_to_end_stage(model: torch.nn.Module, calibration: torch.Tensor, float_outputs, config: QuantConfig, *,
                     device, weights=None, work_dir=None, progress: bool = True) -> dict:
    """The end-to-end pass as the pipeline runs it, on the whole packed model: a streamed model
    (``weights``) is first onloaded whole from its finished blocks in ``work_dir`` and stays so;
    a model in memory moves to ``device`` and back. ``float_outputs`` (the driver's float
    buffer, closed here) gives the targets through the final norm as it is before tuning."""
    home = None
    try:
        if weights is not None:
            onload_packed_model(model, device, weights, finished_blocks(work_dir))
        else:
            home = next(model.parameters()).device
            model.to(device)
        targets = final_states(model, float_outputs, device)
    finally:
        float_outputs.close()
    try:
        return tune_end_to_end(model, calibration, targets, steps=config.e2e_steps, lr=config.e2e_lr, device=device,
                               progress=progress)
    finally:
        if home is not None:
            model.to(home)


def quantize(
    model: torch.nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    work_dir: str | os.PathLike | None = None,
    calibration_info: dict | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
    activations_dtype: torch.dtype | None = None,
    offload_activations: str | os.PathLike | None = None,
    activation_budget: int | None = None,
    stop_after_blocks: int | None = None,
    stats: dict | None = None,
) -> torch.nn.Module:
    """Replace every linear layer in the decoder blocks with a packed ``BinaryLinear``.

    ``calibration`` is a ``(nsamples, seqlen)`` tensor of token ids. With ``work_dir``,
    each finished block is saved there and a rerun with the same model (its weights' digest), options,
    calibration and llmbin version resumes; any other rerun is refused, naming what changed.
    With ``weights`` (from :func:`llmbin.models.open_model`), ``model`` is a meta skeleton whose
    blocks are read, quantized and released one by one; ``work_dir`` is then required, as the
    packed blocks exist only there until :func:`quantize_and_save` writes the checkpoint.
    With ``config.distill`` (any method; ``db-llm --distill`` is DB-LLM's), the distillation stage
    then tunes the scales and norms against a copy of the float model taken before quantization.
    With ``config.e2e_steps``, the end-to-end pass (:mod:`llmbin.e2e_tuning`) instead tunes every
    block's continuous tensors, and the final norm, against the float model's next-token
    distribution, from the float activations the driver propagates beside the quantized ones; a
    streamed model is then held whole, packed, for the pass.
    Afterwards the remaining float tensors are rounded to the checkpoint's fp16, so the returned
    model computes exactly what its saved checkpoint will (and, like a loaded one, serves its
    fp32 lm_head from those fp16 values).
    ``stop_after_blocks`` and ``stats`` are the driver's (:func:`llmbin.driver.quantize_blocks`).
    """
    config.validate()
    ranks = distributed.current()
    if config.distill and config.e2e_steps:
        raise LlmbinError("--distill and --e2e-steps both tune the whole model against the float one; choose one")
    if ranks.distributed and (config.distill or config.e2e_steps):
        raise LlmbinError("distillation and the end-to-end pass run in one process; launch without torchrun, or "
                          "quantize without --distill and --e2e-steps")
    if not torch.is_tensor(calibration) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise LlmbinError("calibration must be a (nsamples, seqlen) LongTensor of token ids; see llmbin.calibration_windows")
    if weights is not None and work_dir is None and ranks.writer:  # other ranks' blocks are rank 0's to write
        raise LlmbinError("a streamed model needs a work_dir for its finished blocks")
    if weights is not None and config.wants_distillation():
        raise LlmbinError("distillation trains the whole model, so it needs the model loaded whole; "
                          "use llmbin.models.load_model (the CLI does this for --distill)")
    if config.e2e_steps and final_norm(model) is None:
        raise LlmbinError(f"the end-to-end pass needs the norm after the last block (model.norm, as in Llama or Qwen2), "
                          f"which {type(model).__name__} does not have; quantize without --e2e-steps")
    check_positions(model.config, calibration.shape[1])
    check_token_ids(model, calibration)
    act_dtype = activations_dtype or float_dtype(model)
    done, on_block_done = {}, None
    if work_dir is not None and ranks.writer:
        model_identity = check_source(model, weights, progress)
        fingerprint = {**run_options(config, calibration_info),
                       "shape": list(calibration.shape), "checksum": int(calibration.sum()),
                       "dtype": str(float_dtype(model)), "activations": str(act_dtype),
                       "device": torch.device(device).type, "model_weights": model_identity}
        store = BlockStore(work_dir, fingerprint)
        done, on_block_done = store.finished(), store.save
        if len(done):
            print(resume_note(len(done), len(decoder_layers(model)), work_dir), flush=True)
    elif ranks.writer:
        check_source(model, weights, progress)
    if ranks.distributed:
        done = SharedBlocks(done if ranks.writer else None, ranks)
    teacher, distill_report = (copy.deepcopy(model) if config.wants_distillation() else None), {}
    float_outputs = quantize_blocks(model, config, calibration, device=device, weights=weights, done=done,
                                    on_block_done=on_block_done, activation_dtype=act_dtype,
                                    offload_activations=offload_activations, fallback_dir=work_dir,
                                    activation_budget=activation_budget, stop_after_blocks=stop_after_blocks,
                                    stats=stats, progress=progress, keep_float_outputs=bool(config.e2e_steps))
    if teacher is not None:
        distill_report = distillation_stage(model, teacher, calibration, config, device=device, progress=progress)
        del teacher
    if float_outputs is not None:
        e2e = end_to_end_stage(model, calibration, float_outputs, config, device=device, weights=weights,
                               work_dir=work_dir, progress=progress)
        if stats is not None:
            stats["e2e"] = e2e
        distill_report = {k: v for k, v in e2e.items() if k != "e2e_seconds"}
    if config.embedding_bits != 16:  # from the float values: the tables' codes are what is stored
        quantize_tables(model, config.embedding_bits, config.embedding_group_size, weights)
    round_to_storage(model)
    serve_half_weights(model, STORAGE_DTYPE)  # as load() does, so the two compute alike
    mark_quantized(model, {
        "format_version": format_version(model),
        "llmbin_version": __version__,
        **config.to_dict(),
        "calibration": calibration_info or {"nsamples": calibration.shape[0], "seqlen": calibration.shape[1]},
        "bits_per_weight": bit_report(model)["bits_per_weight"],
        **distill_report,
    })
    return model


def quantize_and_save(opened: OpenedModel, config: QuantConfig, calibration: torch.Tensor, out: str | os.PathLike, *,
                      device: str | torch.device = "cpu", progress: bool = True, calibration_info: dict | None = None,
                      offload_activations: str | os.PathLike | None = None,
                      activation_budget: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                      stop_after_blocks: int | None = None, stats: dict | None = None) -> torch.nn.Module:
    """Quantize an opened model and write its checkpoint to ``out``; finished blocks go to
    ``OUT.partial/`` as they finish (rerunning resumes), which is removed once ``out`` is complete.

    A streamed model's checkpoint is assembled from those block files and the source shards,
    one shard at a time; a whole model is saved from memory. Returns the model (a skeleton
    with packed layers on the meta device when streamed)."""
    out = Path(out)
    if not distributed.current().writer:  # under torch.distributed, rank 0 writes the blocks and the checkpoint
        return quantize(opened.model, config, calibration, device=device, progress=False,
                        calibration_info=calibration_info, weights=opened.weights,
                        activations_dtype=activation_dtype(opened.dtype, opened.stored_dtype),
                        offload_activations=offload_activations, activation_budget=activation_budget,
                        stop_after_blocks=stop_after_blocks, stats=stats)
    work_dir = claim_output(out)  # locked for this process until the checkpoint is complete
    try:
        model = quantize(opened.model, config, calibration, device=device, progress=progress, work_dir=work_dir,
                         calibration_info=calibration_info, weights=opened.weights,
                         activations_dtype=activation_dtype(opened.dtype, opened.stored_dtype),
                         offload_activations=offload_activations, activation_budget=activation_budget,
                         stop_after_blocks=stop_after_blocks, stats=stats)
        sources = None
        if opened.streamed:
            from accelerate.utils import OffloadedWeightsLoader

            prefix = module_name(model, decoder_layers(model))
            packed = OffloadedWeightsLoader(index=finished_blocks(work_dir).tensor_index(prefix))
            sources = ChainMap(packed, opened.weights)
        save(model, opened.tokenizer, out, sources=sources, max_shard_bytes=max_shard_bytes, progress=progress)
    except BaseException:
        release_output(out, remove=not len(finished_blocks(work_dir)))  # finished blocks stay for the rerun
        raise
    release_output(out, remove=True)
    return model
