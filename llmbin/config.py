"""Method configuration classes. Each is a dataclass whose fields are the method's options;
``to_dict`` is what the checkpoint's ``quantization_config`` records."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .errors import LlmbinError


@dataclass
class QuantConfig:
    method: ClassVar[str] = ""
    percdamp: float = 0.01
    blocksize: int = 128

    def validate(self) -> None:
        if not 0 < self.percdamp < 10:
            raise LlmbinError(f"percdamp must be in (0, 10), got {self.percdamp}; the usual value is 0.01")
        if self.blocksize < 1:
            raise LlmbinError(f"blocksize must be a positive integer, got {self.blocksize}")

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


@dataclass
class PBLLMConfig(QuantConfig):
    """PB-LLM (Shang et al.): a salient fraction kept at ``salient_bits``, the rest binarized."""

    method: ClassVar[str] = "pb-llm"
    salient_frac: float = 0.1
    salient_metric: str = "hessian"  # "hessian": w² / [H⁻¹]ⱼⱼ², or "magnitude": |w|
    salient_bits: int = 8
    refit_scales: bool = True  # re-solve (μ, α) per row for least Hessian-weighted error after GPTQ

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.salient_frac <= 1.0:
            raise LlmbinError(f"--salient-frac must be between 0 and 1, got {self.salient_frac}")
        if self.salient_metric not in ("hessian", "magnitude"):
            raise LlmbinError(f"--salient-metric must be 'hessian' or 'magnitude', got {self.salient_metric!r}")
        if not 2 <= self.salient_bits <= 8:
            raise LlmbinError(f"salient_bits must be between 2 and 8, got {self.salient_bits}")


def config_fields(cls: type[QuantConfig]) -> list[str]:
    return [f.name for f in fields(cls)]
