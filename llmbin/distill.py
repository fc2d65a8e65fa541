"""The distillation stage (``QuantConfig.distill``): DB-LLM's deviation-aware distillation (DAD),
which the pipeline (``llmbin.quantize``) applies after the layer-wise quantization of any method.

After layer-wise quantization the bits stay fixed; the packed layers' scales (α, μ, column
scales) and the normalization weights are tuned so the quantized model's next-token
distribution follows the float model's on the calibration windows. The paper weights each
token's teacher–student divergence by how ambiguous the token is; here the weight is the
product of teacher and student entropies (detached, normalised to mean 1 per window), so
confident tokens where both agree count little and uncertain ones dominate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import QuantConfig
from .nn.binary_linear import BinaryLinear
from .packing.packed_weight import STORAGE_DTYPE

SCALE_BUFFERS = ("alpha", "mu", "col_scale")


def dad_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Entropy-weighted ``KL(teacher ‖ student)`` per token, averaged; logits ``(..., V)``."""
    t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    with torch.no_grad():
        entropy_t = -(t_logp.exp() * t_logp).sum(-1)
        entropy_s = -(s_logp.exp() * s_logp).sum(-1)
        weight = entropy_t * entropy_s
        weight = weight / weight.mean().clamp_min(1e-12)
    return (weight * kl).mean()


def _trainable(student: torch.nn.Module) -> list[torch.Tensor]:
    """Make scales and norm weights float32 leaves that require grad; return them."""
    params = []
    for module in student.modules():
        if isinstance(module, BinaryLinear):
            for name in SCALE_BUFFERS:
                buf = getattr(module, name, None)
                if buf is not None:
                    leaf = buf.detach().float().requires_grad_(True)
                    setattr(module, name, leaf)
                    params.append(leaf)
        elif "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            module.weight.data = module.weight.data.float()
            module.weight.requires_grad_(True)
            params.append(module.weight)
    return params


def _freeze(student: torch.nn.Module) -> None:
    for module in student.modules():
        if isinstance(module, BinaryLinear):
            for name in SCALE_BUFFERS:
                buf = getattr(module, name, None)
                if buf is not None:
                    setattr(module, name, buf.detach().to(STORAGE_DTYPE))
    for p in student.parameters():
        p.requires_grad_(False)


def deviation_aware_distill(student: torch.nn.Module, teacher: torch.nn.Module, calibration: torch.Tensor, *,
                            epochs: int = 1, lr: float = 1e-4, progress: bool = True) -> list[float]:
    """Tune ``student``'s scales and norms in place against ``teacher``; returns the loss per step."""
    device = student.get_input_embeddings().weight.device
    params = _trainable(student)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    student.train(False)
    bar = tqdm(total=epochs * len(calibration), desc="distilling", unit="window", disable=not progress)
    try:
        for _ in range(epochs):
            for ids in calibration:
                ids = ids.unsqueeze(0).to(device)
                with torch.no_grad():
                    target = teacher(ids, use_cache=False).logits
                with torch.enable_grad():
                    loss = dad_loss(target, student(ids, use_cache=False).logits)
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        _freeze(student)
    return losses


def distillation_stage(student: torch.nn.Module, teacher: torch.nn.Module, calibration: torch.Tensor,
                       config: QuantConfig, *, device, progress: bool = True) -> dict:
    """The stage as the pipeline runs it: both models on the compute ``device`` for
    :func:`deviation_aware_distill` with ``config``'s epochs and learning rate, then the student
    back where it was. Returns the losses the checkpoint records."""
    home = next(student.parameters()).device
    losses = deviation_aware_distill(student.to(device), teacher.to(device), calibration, epochs=config.distill_epochs,
                                     lr=config.distill_lr, progress=progress)
    student.to(home)
    return {"distill_loss_first": losses[0], "distill_loss_last": losses[-1]}
