"""llmbin: post-training binarization of large language models, with really packed checkpoints."""

__version__ = "0.1.0"

from . import algorithms as _algorithms  # noqa: E402,F401  (registers the methods)
from .hf_quantizer import LlmbinConfig, LlmbinHfQuantizer, register as _register_with_transformers  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .config import PBLLMConfig, QuantConfig  # noqa: E402
from .data.calibration import calibration_windows  # noqa: E402
from .errors import LlmbinError  # noqa: E402
from .models import open_model  # noqa: E402
from .quantize import quantize, quantize_and_save  # noqa: E402
from .recipes import recipe_config  # noqa: E402
from .registry import available_methods, make_config  # noqa: E402
from .storage import verification  # noqa: E402

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(checkpoint) works once llmbin is imported

__all__ = ["LlmbinConfig", "LlmbinError", "LlmbinHfQuantizer", "PBLLMConfig", "QuantConfig", "available_methods",
           "calibration_windows", "load", "make_config", "open_model", "quantize", "quantize_and_save", "recipe_config",
           "save", "verification"]
