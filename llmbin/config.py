"""Method configuration classes. Each is a dataclass whose fields are the method's options;
``to_dict`` is what the checkpoint's ``quantization_config`` records."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .errors import LlmbinError

ROTATE_CHOICES = ("none", "input", "both")


@dataclass
class QuantConfig:
    method: ClassVar[str] = ""
    percdamp: float = 0.01
    blocksize: int = 128
    rotate: str = "none"  # incoherence processing: "input" (T·x) or "both" sides (and S·y); see algorithms.incoherence
    rotate_seed: int = 0

    def validate(self) -> None:
        check_field_types(self)
        if self.rotate not in ROTATE_CHOICES:
            raise LlmbinError(f"--rotate must be one of {', '.join(ROTATE_CHOICES)}, got {self.rotate!r}")
        if not 0 < self.percdamp < 10:
            raise LlmbinError(f"percdamp must be in (0, 10), got {self.percdamp}; the usual value is 0.01")
        if self.blocksize < 1:
            raise LlmbinError(f"blocksize must be a positive integer, got {self.blocksize}")

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def wants_distillation(self) -> bool:
        """Whether a model-level distillation stage follows the layer-wise quantization."""
        return False


@dataclass
class PBLLMConfig(QuantConfig):
    """PB-LLM (Shang et al.): a salient fraction kept at ``salient_bits``, the rest binarized."""

    method: ClassVar[str] = "pb-llm"
    salient_frac: float = 0.1
    salient_metric: str = "hessian"  # "hessian": w² / [H⁻¹]ⱼⱼ², or "magnitude": |w|
    salient_bits: int = 8
    refit_scales: bool = True  # re-solve (μ, α) per row for least Hessian-weighted error after GPTQ
    scale_search: int = 6  # GPTQ passes with α scaled by 0.5…1; each row keeps its best (0 or 1: one pass, α as fitted)
    order_search: bool = True  # reconstruct again in activation order (GPTQ's desc_act); the layer keeps the better

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.salient_frac <= 1.0:
            raise LlmbinError(f"--salient-frac must be between 0 and 1, got {self.salient_frac}")
        if self.salient_metric not in ("hessian", "magnitude"):
            raise LlmbinError(f"--salient-metric must be 'hessian' or 'magnitude', got {self.salient_metric!r}")
        if not 2 <= self.salient_bits <= 8:
            raise LlmbinError(f"salient_bits must be between 2 and 8, got {self.salient_bits}")
        if not 0 <= self.scale_search <= 16:
            raise LlmbinError(f"scale_search must be between 0 and 16 GPTQ passes, got {self.scale_search}")


_KINDS = {"bool": ((bool,), "true or false"), "int": ((int,), "an integer"),
          "float": ((int, float), "a number"), "str": ((str,), "a string")}


def check_field_types(config: QuantConfig) -> None:
    """Each option holds its field's type, so that a recipe's ``refit_scales: "false"`` (a string,
    which Python would take as true) or ``blocksize: 64.0`` is refused by name, not run."""
    for f in fields(config):
        value = getattr(config, f.name)
        allowed, wanted = _KINDS[f.type]
        if not isinstance(value, allowed) or (isinstance(value, bool) and f.type != "bool"):
            hint = " (quoted in the recipe? write it without quotes)" if isinstance(value, str) else ""
            raise LlmbinError(f"option {f.name} must be {wanted}, got {value!r}{hint}")


def config_fields(cls: type[QuantConfig]) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass
class RTNSignConfig(QuantConfig):
    """Round-to-nearest sign binarization, ``ŵ = α·sign(w)`` with ``α = mean|w|`` per row (no calibration use)."""

    method: ClassVar[str] = "rtn-sign"


@dataclass
class GPTQConfig(QuantConfig):
    """GPTQ (Frantar et al.): asymmetric uniform ``bits``-bit grid per row (``group_size`` 0) or per group."""

    method: ClassVar[str] = "gptq"
    bits: int = 2
    group_size: int = 0  # 0: one grid per output row; e.g. 128: one per 128 input columns

    def validate(self) -> None:
        super().validate()
        if not 2 <= self.bits <= 8:
            raise LlmbinError(f"--bits must be between 2 and 8, got {self.bits}")
        if self.group_size < 0:
            raise LlmbinError(f"--group-size must be 0 (per row) or positive, got {self.group_size}")


@dataclass
class DBLLMConfig(QuantConfig):
    """DB-LLM (Chen et al.) flexible dual binarization: ``ŵ = μ + α₁b₁ + α₂b₂`` per row or group,
    with optional deviation-aware distillation of the scales and norms afterwards."""

    method: ClassVar[str] = "db-llm"
    group_size: int = 0  # 0: scales per output row
    refine_iters: int = 20  # alternating least-squares rounds of the scales and planes
    refit_scales: bool = True  # re-solve the scales for least Hessian-weighted error after GPTQ
    distill: bool = False  # second stage: tune scales and norms against the float model's outputs
    distill_epochs: int = 1
    distill_lr: float = 1e-4

    def validate(self) -> None:
        super().validate()
        if self.group_size < 0:
            raise LlmbinError(f"--group-size must be 0 (per row) or positive, got {self.group_size}")
        if self.refine_iters < 0 or self.distill_epochs < 1 or not self.distill_lr > 0:
            raise LlmbinError("--refine-iters must be >= 0, --distill-epochs >= 1 and --distill-lr > 0")

    def wants_distillation(self) -> bool:
        return self.distill


@dataclass
class BiLLMConfig(QuantConfig):
    """BiLLM (Huang et al.): per block, salient columns get residual (two-plane) binarization,
    the other weights split at a searched magnitude break-point into two binarized classes."""

    method: ClassVar[str] = "billm"
    salient_metric: str = "hessian"
    max_salient_columns: int = 30  # the salient column count is searched in [1, this] per block
    split_points: int = 81  # break-point candidates: this many quantiles of |w| from 10 % to 90 %
    refine_iters: int = 0  # ARB alternating refinement rounds (0: BiLLM's closed form)
    refit_scales: bool = False  # re-solve the scales for least Hessian-weighted error after GPTQ (ARB-X)

    def validate(self) -> None:
        super().validate()
        if self.salient_metric not in ("hessian", "magnitude"):
            raise LlmbinError(f"--salient-metric must be 'hessian' or 'magnitude', got {self.salient_metric!r}")
        if self.max_salient_columns < 0 or self.split_points < 1 or self.refine_iters < 0:
            raise LlmbinError("--max-salient-columns and --refine-iters must be >= 0, --split-points >= 1")


@dataclass
class ARBXConfig(BiLLMConfig):
    """ARB-LLM-X (Li et al.): BiLLM's structure with alternating refinement of μ, α and signs,
    then a calibration-aware (Hessian-weighted) refit of the scales."""

    method: ClassVar[str] = "arb-x"
    refine_iters: int = 15
    refit_scales: bool = True


@dataclass
class ARBRCConfig(BiLLMConfig):
    """ARB-LLM-RC (Li et al.): BiLLM's structure with row and column scales ``α_r·β_c`` (no mean),
    refined alternately."""

    method: ClassVar[str] = "arb-rc"
    refine_iters: int = 15
