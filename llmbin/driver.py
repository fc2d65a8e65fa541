"""The sequential driver: all model plumbing for layer-by-layer quantization lives here.

Capture the first decoder block's inputs, then for each block: onload its weights, accumulate
each linear's Hessian with hooks, quantize every linear with the method function and the layer
stages around it (``algorithms.layer``: rotation, scale refit), install the packed layers, run
the *quantized* block to produce the next block's inputs, and release the block. Only one
block's weights, Hessians and activations are resident at a time; with a streamed model (a
meta skeleton plus lazily read shards, see ``placement``) the rest of the model is not in
memory at all.

Activations live in one buffer (``activations``) in the model's 16-bit dtype: each window's
slot holds the current block's input and is overwritten by its output.

Under torch.distributed (``distributed``), each rank holds only its chunks' windows; the Hessians
are summed chunk by chunk in one order at any world size, the block's layers are spread over the
ranks, and every rank installs every packed layer and propagates its own windows.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .activations import activation_store, default_budget
from .algorithms.hessian import add_outer_products
from .algorithms.incoherence import check_rotatable, layer_rotation
from .algorithms.layer import quantize_layer
from .block_tuning import tune_block, tuned_outside_packed
from .checkpoint.resume import block_tensors, modules_from_tensors
from .config import QuantConfig
from .errors import LlmbinError, QuantizationStopped
from .models import decoder_layers, linear_layers
from .nn.binary_linear import BinaryLinear
from .nn.tree import set_submodule
from .placement import Placement, tensor_names
from .registry import method_function

# A finished block: its packed layers by name inside the block, and, when it was tuned, its other
# tuned tensors (norm weights) by state-dict name inside the block.
BlockState = dict[str, "BinaryLinear | torch.Tensor"]
LayerDone = Callable[[int, BlockState], None]


class _StopForward(Exception):
    pass


def module_name(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calibration: torch.Tensor, placement: Placement, *,
                         dtype: torch.dtype, offload_dir=None, fallback_dir=None, budget: int | None = None):
    """Run the model up to its first decoder block on the device; return an activation store with
    each window's hidden states and the keyword arguments the blocks share (masks, rotary embeddings).

    Everything outside the decoder blocks but the output head is onloaded for this pass and
    released after it."""
    blocks = decoder_layers(model)
    prefix = module_name(model, blocks)
    head = model.get_output_embeddings()
    skip = [prefix] + ([module_name(model, head)] if head is not None else [])
    outside = [n for n in tensor_names(model) if not any(n == s or n.startswith(s + ".") for s in skip)]
    placement.onload(model, outside)
    store, shared, window = None, {}, 0

    def grab(_module, args, kwargs):
        nonlocal store
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if store is None:
            store = activation_store(len(calibration), tuple(hidden.shape), dtype, offload_dir=offload_dir,
                                     fallback_dir=fallback_dir, budget=budget)
        store[window] = hidden
        if not shared:
            shared.update({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window, ids in enumerate(calibration):
            try:
                model(ids.unsqueeze(0).to(placement.device), use_cache=False)
            except _StopForward:
                pass
    except BaseException:
        if store is not None:
            store.close()
        raise
    finally:
        handle.remove()
        placement.release(model, outside)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # onloading replaced the embedding's Parameter; restore the tie to the head
    return store, _to_device(shared, placement.device)


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _run_block(block, store, kwargs, device, dtype, write_back: bool, windows=None) -> None:
    """Run every window (or those in ``windows``) through ``block``; with ``write_back``, each output replaces its input."""
    for i in range(len(store)) if windows is None else windows:
        out = block(store[i].to(device=device, dtype=dtype), **kwargs)
        if write_back:
            store[i] = out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    weights: Mapping[str, torch.Tensor] | None = None,
    done: Mapping[int, dict[str, BinaryLinear]] | None = None,
    on_block_done: LayerDone | None = None,
    activation_dtype: torch.dtype | None = None,
    offload_activations=None,
    fallback_dir=None,
    activation_budget: int | None = None,
    stop_after_blocks: int | None = None,
    stats: dict | None = None,
    progress: bool = True,
    keep_float_outputs: bool = False,
):
    """Quantize every linear layer of every decoder block in place.

    ``weights`` (a lazy mapping of state-dict names to stored tensors) makes ``model`` a meta
    skeleton that is onloaded block by block; each block, packed layers included, goes back to
    the meta device once done, so ``on_block_done`` must persist it. Without ``weights`` the
    model is in memory and keeps its packed layers. ``done`` maps block indices already
    quantized (e.g. resumed from disk) to their packed layers and tuned parameters (a
    ``BlockState``, as ``on_block_done`` receives it); they are installed and only run forward.
    Activations are kept in ``activation_dtype`` (default: the model's), in memory or, with
    ``offload_activations`` (a folder) or past ``activation_budget`` bytes, on disk; with
    ``config.tune`` the float activations take a second buffer, and the two share the budget.
    With ``stop_after_blocks``, :class:`QuantizationStopped` is raised once that many blocks have
    been newly quantized (and passed to ``on_block_done``). ``stats`` receives timings:
    ``capture_seconds``, ``block_seconds`` (block index -> seconds, newly quantized blocks only)
    and, when tuning, ``tune`` (block index -> ``block_tuning.tune_block``'s report).
    With ``keep_float_outputs`` the float activations are propagated too (as for tuning) and the
    buffer, holding the float model's last-block output for every window, is returned for the
    caller to close (the end-to-end pass's targets); otherwise None is returned.
    """
    ranks = distributed.current()
    placement = Placement(device, weights)
    blocks = decoder_layers(model)
    prefix = module_name(model, blocks)
    shapes = {f"{prefix}.{index}.{name}": tuple(linear.weight.shape)
              for index, block in enumerate(blocks) for name, linear in linear_layers(block).items()}
    configs = config.layer_configs(list(shapes))  # the layers rules, each checked to match some layer
    for chosen in {id(c): c for c in configs.values()}.values():
        check_rotatable(chosen, {n: shape for n, shape in shapes.items() if configs[n] is chosen})
    dtype = float_dtype(model)
    done = done or {}
    stats = {} if stats is None else stats
    stats["block_seconds"], start = {}, time.perf_counter()
    float_pass = config.tune or keep_float_outputs
    if float_pass:  # two buffers share the budget one would have
        activation_budget = (default_budget() if activation_budget is None else activation_budget) // 2
    distributed.check_world(ranks, len(calibration))
    own = distributed.own_windows(ranks, len(calibration))  # this rank's windows, in store slots 0, 1, ...
    slot = {window: i for i, window in enumerate(own)}
    all_chunks = distributed.chunks(len(calibration))
    chunks = [(c, [slot[w] for w in part]) for c, part in enumerate(all_chunks) if ranks.chunk_owner(c) == ranks.rank]
    store, kwargs = capture_block_inputs(model, calibration[own], placement, dtype=activation_dtype or dtype,
                                         offload_dir=offload_activations, fallback_dir=fallback_dir,
                                         budget=activation_budget)
    stats["capture_seconds"] = time.perf_counter() - start
    targets, kept = None, False
    try:
        if float_pass:
            targets = activation_store(len(store), store.shape, store.dtype, offload_dir=offload_activations,
                                       fallback_dir=fallback_dir, budget=activation_budget)
            for i in range(len(store)):
                targets[i] = store[i]
            if config.tune:
                stats["tune"] = {}
        bar = tqdm(range(len(blocks)), desc="quantizing blocks", unit="block", disable=not progress or not ranks.writer)
        for index in bar:
            start, name = time.perf_counter(), f"{prefix}.{index}"
            block = placement.onload_module(model, name)
            if targets is not None:  # the float block's outputs: this block's tuning targets, the next's float inputs
                bar.set_postfix_str("float outputs")
                _run_block(block, targets, kwargs, placement.device, dtype, write_back=True)
            if index in done:
                _install(block, done[index], placement.device)
            else:
                bar.set_postfix_str("collecting Hessians")
                block_configs = {n: configs[f"{name}.{n}"] for n in linear_layers(block)}
                finished: BlockState = _quantize_block(block, store, kwargs, block_configs.__getitem__, placement.device,
                                                       dtype, index, chunks, len(all_chunks), ranks)
                if config.tune:
                    bar.set_postfix_str("tuning")
                    stats["tune"][index] = tune_block(block, store, targets, kwargs, steps=config.tune_steps,
                                                      batch=config.tune_batch, lr=config.tune_lr,
                                                      device=placement.device, seed=index,
                                                      windows=len(calibration), ranks=ranks)
                    finished.update(tuned_outside_packed(block))
                if on_block_done is not None:
                    on_block_done(index, finished)
            bar.set_postfix_str("propagating")
            _run_block(block, store, kwargs, placement.device, dtype, write_back=True)
            placement.release_module(model, name)
            if index not in done:
                stats["block_seconds"][index] = time.perf_counter() - start
                if stop_after_blocks is not None and len(stats["block_seconds"]) >= stop_after_blocks:
                    raise QuantizationStopped(len(stats["block_seconds"]))
        kept = keep_float_outputs
        return targets if kept else None
    finally:
        store.close()
        if targets is not None and not kept:
            targets.close()


def onload_packed_model(model: nn.Module, device, weights: Mapping[str, torch.Tensor],
                        finished: Mapping[int, BlockState]) -> None:
    """Put a streamed model, all of it, on ``device``: each decoder block with its packed layers
    and tuned tensors from ``finished`` (every block's state), and the tensors outside the blocks
    (embedding, final norm, output matrix) from ``weights``. For the end-to-end pass, which trains
    the whole packed model."""
    placement = Placement(device, weights)
    blocks = decoder_layers(model)
    prefix = module_name(model, blocks)
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}"
        packed = tuple(f"{name}.{n}." for n, m in block.named_modules() if isinstance(m, BinaryLinear))
        # the packed layers (meta since the run released them) come from their finished file, the rest from weights
        placement.onload(model, [n for n in tensor_names(block, name) if not n.startswith(packed)])
        _install(block, finished[index], placement.device)
    placement.onload(model, [n for n in tensor_names(model) if not n.startswith(prefix + ".")])
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # onloading replaced the embedding's Parameter; restore the tie to the head


def _install(block: nn.Module, state: BlockState, device) -> None:
    """Put a finished block's packed layers, and its tuned parameters if any, into the onloaded ``block``."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            try:
                param = block.get_parameter(name)
            except AttributeError:
                raise LlmbinError(f"a finished block holds {name}, which the model's blocks lack; delete the "
                                  "output's .partial folder and quantize again") from None
            param.data = value.to(device=device, dtype=param.dtype)
        else:
            set_submodule(block, name, value.to(device))


class _Hessians:
    """Each linear's ``H = 2/n Σ x xᵀ`` over the calibration windows, in float32: the sum of each
    chunk's ``Σ x xᵀ`` (``distributed.chunks``), the chunks added in order. Under torch.distributed
    the running total goes from each chunk's owner to the next's, so every rank's arithmetic is
    the single process's. Linears fed the very same input tensor (q/k/v, gate/up) share one
    matrix: it is identical, and at 70B the gate/up/down and q/k/v copies would cost gigabytes."""

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device):
        self.device, self.leader = device, {}
        self.sums: dict[str, torch.Tensor] = {}  # leader -> Σ x xᵀ over the finished chunks
        self.rows: dict[str, int] = {}
        self.chunk: dict[str, torch.Tensor] = {}  # leader -> Σ x xᵀ over this chunk so far
        self.chunk_rows: dict[str, int] = {}
        self._last: tuple[torch.Tensor | None, str | None] = (None, None)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def accumulate(_module, args, _output):
            x = args[0]
            if name not in self.leader:
                last_x, last_leader = self._last
                self.leader[name] = last_leader if x is last_x else name
            leader = self.leader[name]
            if leader == name:
                S = self.chunk.get(name)
                if S is None:
                    S = self.chunk[name] = torch.zeros(x.shape[-1], x.shape[-1], device=self.device)
                self.chunk_rows[name] = self.chunk_rows.get(name, 0) + add_outer_products(S, x)
            self._last = (x, leader)
        return accumulate

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = (None, None)

    def end_chunk(self, chunk: int, count: int, ranks: distributed.Ranks) -> None:
        """Add this chunk's sums to the total of chunks ``0..chunk-1`` (received from that chunk's
        owner) and pass the total on to the next chunk's owner."""
        if ranks.distributed and chunk > 0:
            self.sums, info = distributed.recv(ranks.chunk_owner(chunk - 1), ranks, self.device)
            self.rows = info["rows"]
            self.leader = {**info["leaders"], **self.leader}
        for leader, S in self.chunk.items():
            if leader in self.sums:
                self.sums[leader].add_(S)
            else:
                self.sums[leader] = S
            self.rows[leader] = self.rows.get(leader, 0) + self.chunk_rows[leader]
        self.chunk, self.chunk_rows = {}, {}
        if ranks.distributed and chunk < count - 1:
            distributed.send(self.sums, {"rows": self.rows, "leaders": self.leader}, ranks.chunk_owner(chunk + 1), ranks)
            self.sums, self.rows = {}, {}

    def finish(self, holder: int, owners: dict[str, int], ranks: distributed.Ranks) -> None:
        """Scale the totals to ``2/n Σ x xᵀ`` on ``holder`` (the last chunk's owner) and send each to the
        ranks that own a linear it belongs to (``owners``: linear name -> rank)."""
        if ranks.distributed:
            self.leader = distributed.broadcast_value(self.leader, holder, ranks)
        if ranks.rank == holder:
            for leader, H in self.sums.items():
                H.mul_(2.0 / self.rows[leader])
        if not ranks.distributed:
            return
        for leader in sorted(set(self.leader.values())):  # one order on every rank
            targets = sorted({owners[n] for n, lead in self.leader.items() if lead == leader} - {holder})
            for target in targets:
                if ranks.rank == holder:
                    distributed.send({"H": self.sums[leader]}, {}, target, ranks)
                elif ranks.rank == target:
                    self.sums[leader] = distributed.recv(holder, ranks, self.device)[0]["H"]
        mine = {self.leader[n] for n, r in owners.items() if r == ranks.rank and n in self.leader}
        self.sums = {k: v for k, v in self.sums.items() if k in mine}  # the holder keeps only its own layers'

    def pop(self, name: str, columns: int, remaining: list[str]) -> torch.Tensor:
        """``name``'s Hessian (zero if it never ran); freed here once no linear in ``remaining`` shares it."""
        leader = self.leader.get(name)
        if leader is None:
            return torch.zeros(columns, columns, device=self.device)
        H = self.sums[leader]
        if not any(self.leader.get(r) == leader for r in remaining):
            del self.sums[leader]
        return H


def _layer_cost(linear: nn.Linear) -> float:
    """About what reconstructing a layer costs (the GPTQ-style column loop and the inverse): to balance ranks."""
    return float(linear.out_features) * linear.in_features ** 2 + float(linear.in_features) ** 3


def _quantize_block(block, store, kwargs, layer_config: Callable[[str], QuantConfig], device, dtype, index,
                    chunks: list[tuple[int, list[int]]] | None = None, total_chunks: int | None = None,
                    ranks: distributed.Ranks = distributed.SINGLE) -> dict[str, BinaryLinear]:
    """Quantize ``block``'s linears in place from the windows in ``store``, each with the config
    ``layer_config`` gives for its name in the block (``QuantConfig.layer_configs``). ``chunks`` lists this rank's
    chunks of the ``total_chunks`` as (chunk index, slots in ``store``); by default, one process's
    chunks of all the windows in ``store``."""
    linears = linear_layers(block)
    if chunks is None:
        chunks = [(c, list(part)) for c, part in enumerate(distributed.chunks(len(store)))]
        total_chunks = len(chunks)
    hessians = _Hessians(linears, device)
    try:
        for chunk, slots in chunks:  # only the Hessian hooks matter here
            _run_block(block, store, kwargs, device, dtype, write_back=False, windows=slots)
            hessians.end_chunk(chunk, total_chunks, ranks)
    finally:
        hessians.remove_hooks()
    names = list(linears)
    owner = dict(zip(names, distributed.assign([_layer_cost(linears[n]) for n in names], ranks.world)))
    hessians.finish(ranks.chunk_owner(total_chunks - 1), owner, ranks)
    packed: dict[str, BinaryLinear] = {}
    mine = [n for n in names if owner[n] == ranks.rank]
    while mine:  # each float weight is dropped as soon as its layer is packed
        name = mine.pop(0)
        linear = linears.pop(name)
        # the Hessian is handed over, not kept here: rotated, its original is freed while the method runs
        # (one K × K matrix fewer at the block's peak, 321 MB for Qwen2.5-1.5B's down_proj, 3.3 GB for 70B's)
        config = layer_config(name)
        weight = quantize_layer(method_function(config), linear.weight.detach(),
                                _finite_hessian(hessians, name, linear.in_features, mine, index),
                                config, layer_rotation(config, f"{index}.{name}"))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        packed[name] = BinaryLinear(weight, bias).to(device)
        set_submodule(block, name, packed[name])
        del linear, weight
    if ranks.distributed:  # every rank installs every layer, sent by its owner as a finished block stores it
        for name in names:
            mine = name in packed
            tensors, layers = block_tensors({name: packed[name]}) if mine else (None, None)
            tensors, info = distributed.broadcast(tensors, {"layers": layers} if mine else None, owner[name], ranks,
                                                  device)
            if not mine:
                linears.pop(name)  # the float layer goes as its packed one comes
                packed[name] = modules_from_tensors(tensors, info["layers"])[name]
                set_submodule(block, name, packed[name])
    return {name: packed[name] for name in names}


def _finite_hessian(hessians: "_Hessians", name: str, columns: int, later: list[str], index: int) -> torch.Tensor:
    H = hessians.pop(name, columns, later)
    if not torch.isfinite(H).all():
        raise LlmbinError(f"block {index} {name} saw NaN or infinite activations in calibration; check the model and data")
    return H
