"""The token embedding and the output matrix served from quantized tables (``packing.table``).

``TableLinear`` replaces the lm_head and ``TableEmbedding`` the input embedding. Both keep the
table as two frozen Parameters, ``weight`` (the integer codes) and ``weight_scale``, so that a
tied pair shares them as the float pair shared ``weight``: transformers ties ``lm_head.weight``
to the embedding's by name, and ``weight_scale`` is tied alongside it (:func:`tie_tables`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LlmbinError
from ..kernels.dispatch import kernel_path
from ..kernels.table import table_linear
from ..packing.table import TABLE_KIND, QuantTable
from .tree import set_submodule


class TableModule(nn.Module):
    def _set_table(self, table: QuantTable) -> None:
        self.weight = nn.Parameter(table.codes, requires_grad=False)
        self.weight_scale = nn.Parameter(table.scale, requires_grad=False)
        self.layout = table.metadata()

    def table(self) -> QuantTable:
        layout = self.layout
        return QuantTable(self.weight, self.weight_scale, layout["bits"], layout["group_size"], tuple(layout["shape"]))


class TableLinear(TableModule):
    """``y = x @ Ŵᵀ (+ bias)`` for a quantized table ``Ŵ`` (the lm_head)."""

    def __init__(self, table: QuantTable, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = table.shape
        self._set_table(table)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = table_linear(x, self.table(), use_kernel=kernel_path(x) is not None)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.layout['bits']}"


class TableEmbedding(TableModule):
    """The rows ``Ŵ[ids]`` of a quantized table, decoded in ``out_dtype`` (the input embedding)."""

    def __init__(self, table: QuantTable, padding_idx: int | None, out_dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx, self.out_dtype = padding_idx, out_dtype
        self._set_table(table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table().dense(self.out_dtype, ids)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() change the output dtype (the codes are integers and stay); device moves do not
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.layout['bits']}"


def table_modules(model: nn.Module) -> dict[str, TableModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TableModule)}


def stored_tables(model: nn.Module) -> dict[str, TableModule]:
    """The table modules whose tables the checkpoint stores: a tied output matrix serves the
    embedding's table, which is stored (and described) once, under the embedding's name."""
    seen, out = set(), {}
    for name, module in table_modules(model).items():
        if id(module.weight) not in seen:
            seen.add(id(module.weight))
            out[name] = module
    return out


@torch.no_grad()
def quantize_tables(model: nn.Module, bits: int, group_size: int,
                    weights: Mapping[str, torch.Tensor] | None = None) -> int:
    """Replace the model's input embedding and output matrix by quantized tables of ``bits`` with
    ``group_size`` columns per scale; a tied pair becomes one table that both serve. A weight on
    the meta device (a streamed model) is read from ``weights`` by its state-dict name. Returns
    the number of tables made (0, 1 or 2)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    made: dict[int, QuantTable] = {}  # id(float weight) -> its table: a tied weight is quantized once

    def table_of(module: nn.Module) -> QuantTable:
        key = id(module.weight)
        if key not in made:
            W = module.weight
            if W.is_meta:
                W = weights[f"{names[id(module)]}.weight"]
            made[key] = QuantTable.quantize(W.detach(), bits, group_size)
        return made[key]

    count, replaced = 0, {}
    if isinstance(embedding, nn.Embedding):
        table = table_of(embedding)
        replaced[id(embedding.weight)] = module = TableEmbedding(table, embedding.padding_idx, _float_dtype(model))
        set_submodule(model, names[id(embedding)], module)
        count += 1
    if head is not None and type(head) is not nn.Linear and id(getattr(head, "weight", None)) in replaced:
        raise LlmbinError(f"the output matrix ({type(head).__name__}) is tied to the embedding but is not a plain "
                          "linear layer, so it cannot serve the embedding's table; use --embedding-bits 16")
    if type(head) is nn.Linear:
        shared = replaced.get(id(head.weight))
        bias = None if head.bias is None else head.bias.detach()
        layer = TableLinear(table_of(head), bias)
        if shared is not None:  # tied: one table, one pair of Parameters
            layer.weight, layer.weight_scale = shared.weight, shared.weight_scale
        else:
            count += 1
        set_submodule(model, names[id(head)], layer)
    return count


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def table_skeleton(model: nn.Module, layouts: Mapping[str, dict], stored: Mapping[str, torch.Tensor],
                   dtype: torch.dtype) -> None:
    """Before loading: the embedding and output matrix that the checkpoint stores as tables
    (``layouts`` of kind ``table``, by module name; ``stored``: meta tensors of the stored shapes)
    become empty table modules on meta, and a tied output matrix shares the embedding's."""
    tables = {name: layout for name, layout in layouts.items() if layout.get("kind") == TABLE_KIND}
    if not tables:
        return
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    made = {}
    for name, layout in tables.items():
        table = QuantTable.from_tensors({k.rpartition(".")[2]: v for k, v in stored.items()
                                         if k.rpartition(".")[0] == name}, layout)
        if embedding is not None and names.get(id(embedding)) == name:
            made[name] = TableEmbedding(table, getattr(embedding, "padding_idx", None), dtype)
        elif head is not None and names.get(id(head)) == name:
            made[name] = TableLinear(table, None if head.bias is None else torch.empty_like(head.bias, device="meta"))
        else:
            raise ValueError(f"{name} is stored as a table but is neither the input embedding nor the output matrix")
        set_submodule(model, name, made[name])
    head_name, embedding_name = names.get(id(head)), names.get(id(embedding))
    if head is not None and head_name not in made and embedding_name in made and f"{head_name}.weight" not in stored:
        # tied (the checkpoint stores the table once, as the embedding's): the head serves it too,
        # and its scale is tied by name beside the weight that transformers ties
        source = made[embedding_name]
        set_submodule(model, head_name, TableLinear(source.table(), None))
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            tied[f"{head_name}.weight_scale"] = f"{embedding_name}.weight_scale"


def tie_tables(model: nn.Module) -> None:
    """A tied output matrix serves the embedding's table: share both Parameters (transformers ties ``weight``)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, TableEmbedding) and isinstance(head, TableLinear) and head.weight is embedding.weight:
        head.weight_scale = embedding.weight_scale
