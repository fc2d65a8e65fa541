"""Method configuration classes. Each is a dataclass whose fields are the method's options;
``to_dict`` is what the checkpoint's ``quantization_config`` records.

``QuantConfig`` holds the options of the stages the pipeline applies around every method's
function, each configured once here: incoherence processing (``rotate``), the scale refit
(``refit_scales``, whose default each method sets), block-wise tuning (``tune``), the end-to-end
pass (``e2e_steps``) and distillation (``distill``). A variant that differs from a method only in its defaults is a recipe
(``recipes/``), not a class."""
from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import ClassVar

from .errors import LlmbinError

ROTATE_CHOICES = ("none", "input", "both")
TUNE_FIELDS = ("tune", "tune_steps", "tune_batch", "tune_lr")
E2E_FIELDS = ("e2e_steps", "e2e_lr")
LATER_OPTIONS = ("planes", "layers", "embedding_bits", "embedding_group_size")  # added after checkpoints were written: at their default they record nothing
# Options a layer rule may not set: the method is the run's, and the stages after the layer-wise pass are per block or model.
NOT_PER_LAYER = ("layers", "tune", "tune_steps", "tune_batch", "tune_lr", "e2e_steps", "e2e_lr", "distill",
                 "distill_epochs", "distill_lr", "embedding_bits", "embedding_group_size")
EMBEDDING_BITS = (16, 8, 4)


@dataclass
class QuantConfig:
    method: ClassVar[str] = ""
    percdamp: float = 0.01
    blocksize: int = 128
    rotate: str = "none"  # incoherence processing: "input" (T·x) or "both" sides (and S·y); see algorithms.incoherence
    rotate_seed: int = 0
    refit_scales: bool = False  # stage: re-solve the scales for least Hessian-weighted error after the method's fit
    tune: bool = False  # stage: after each block's layer-wise pass, tune its continuous parameters (llmbin.block_tuning)
    tune_steps: int = 32  # optimizer steps per block (32: one pass over the README protocol's 32 windows)
    tune_batch: int = 1  # calibration windows per step
    tune_lr: float = 1e-2  # Adam step size, relative to each tuned tensor's mean magnitude
    e2e_steps: int = 0  # stage: after every block, Adam steps tuning them all against the float logits (llmbin.e2e_tuning)
    e2e_lr: float = 3e-3  # its step size, relative to each tuned tensor's mean magnitude (3e-3 beat 1e-3 on SmolLM2)
    distill: bool = False  # stage: tune scales and norms against the float model's outputs (llmbin.distill)
    distill_epochs: int = 1
    distill_lr: float = 1e-4
    # Per-layer rules: [{"match": REGEX, option: value, ...}, ...]. A linear whose module name (e.g.
    # model.layers.3.mlp.down_proj) contains a match of its regex (re.search) takes the first such rule's options.
    layers: list = field(default_factory=list)
    # The token embedding and the output matrix (lm_head): 16 keeps them in fp16; 8 or 4 stores them
    # as quantized tables with one fp16 scale per embedding_group_size columns (llmbin.packing.table).
    embedding_bits: int = 16
    embedding_group_size: int = 64

    def validate(self) -> None:
        check_field_types(self)
        if self.embedding_bits not in EMBEDDING_BITS:
            raise LlmbinError(f"--embedding-bits must be 16, 8 or 4, got {self.embedding_bits}")
        if self.embedding_group_size < 2 or self.embedding_group_size % 2:
            raise LlmbinError(f"--embedding-group-size must be an even number of columns, got {self.embedding_group_size}")
        for number, rule in enumerate(self.layers, 1):
            self._rule_config(number, rule)
        if self.rotate not in ROTATE_CHOICES:
            raise LlmbinError(f"--rotate must be one of {', '.join(ROTATE_CHOICES)}, got {self.rotate!r}")
        if not 0 < self.percdamp < 10:
            raise LlmbinError(f"percdamp must be in (0, 10), got {self.percdamp}; the usual value is 0.01")
        if self.blocksize < 1:
            raise LlmbinError(f"blocksize must be a positive integer, got {self.blocksize}")
        if self.tune_steps < 1 or self.tune_batch < 1 or not self.tune_lr > 0:
            raise LlmbinError(f"--tune-steps and --tune-batch must be >= 1 and --tune-lr > 0, got {self.tune_steps}, "
                              f"{self.tune_batch} and {self.tune_lr}")
        if self.e2e_steps < 0 or not self.e2e_lr > 0:
            raise LlmbinError(f"--e2e-steps must be >= 0 (0: no end-to-end pass) and --e2e-lr > 0, got {self.e2e_steps} "
                              f"and {self.e2e_lr}")
        if self.distill_epochs < 1 or not self.distill_lr > 0:
            raise LlmbinError(f"--distill-epochs must be >= 1 and --distill-lr > 0, got {self.distill_epochs} and "
                              f"{self.distill_lr}")

    def to_dict(self) -> dict:
        """The record of these options. A stage added later that is off, or an option added later at its
        default, records nothing, so a run or checkpoint written before it existed keeps its record (and
        its resume fingerprint)."""
        data = {"method": self.method, **asdict(self)}
        for on, names in ((self.tune, TUNE_FIELDS), (self.e2e_steps, E2E_FIELDS)):
            if not on:
                for name in names:
                    del data[name]
        for f in fields(self):
            if f.name in LATER_OPTIONS and data[f.name] == (f.default_factory() if f.default is MISSING else f.default):
                del data[f.name]
        return data

    def _rule_config(self, number: int, rule) -> "QuantConfig":
        """The config of the layers rule ``number`` (1-based) selects, checked: a mistake names the rule."""
        where = f"layers rule {number}"
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
            raise LlmbinError(f"{where} must be a mapping with a 'match' regex and options, e.g. "
                              f"{{match: mlp.down_proj, planes: 2}}; got {rule!r}")
        try:
            re.compile(rule["match"])
        except re.error as exc:
            raise LlmbinError(f"{where}: match {rule['match']!r} is not a regular expression ({exc})") from None
        options = {k: v for k, v in rule.items() if k != "match"}
        names = config_fields(type(self))
        fixed = sorted(k for k in options if k in NOT_PER_LAYER or k == "method")
        if fixed:
            raise LlmbinError(f"{where} sets {', '.join(fixed)}, which apply to the whole run, not one layer; "
                              "set them outside the rules")
        unknown = sorted(set(options) - set(names))
        if unknown:
            per_layer = ", ".join(n for n in names if n not in NOT_PER_LAYER)
            raise LlmbinError(f"{where} sets unknown option(s) for {self.method}: {', '.join(unknown)}; valid: {per_layer}")
        config = replace(self, layers=[], **options)
        try:
            config.validate()
        except LlmbinError as exc:
            raise LlmbinError(f"{where} (match {rule['match']!r}): {exc}") from None
        return config

    def layer_configs(self, names: list[str]) -> dict[str, "QuantConfig"]:
        """Each linear's config, by module name: the first rule whose ``match`` is found in the name
        sets its options; a layer no rule matches keeps these. A rule that matches no layer is a
        mistake (a typo would silently quantize every layer alike) and is refused by name."""
        rules = [(re.compile(rule["match"]), self._rule_config(number, rule))
                 for number, rule in enumerate(self.layers, 1)]
        chosen, used = {}, set()
        for name in names:
            number = next((i for i, (pattern, _) in enumerate(rules) if pattern.search(name)), None)
            chosen[name] = self if number is None else rules[number][1]
            used.add(number)
        for number, rule in enumerate(self.layers):
            if number not in used:
                example = names[0] if names else "none"
                raise LlmbinError(f"layers rule {number + 1} (match {rule['match']!r}) matches no linear layer, so it "
                                  f"would do nothing; the layers are named like {example}")
        return chosen

    def wants_refit(self) -> bool:
        """Whether the layer pipeline refits the scales after the method's fit (``algorithms.layer``)."""
        return self.refit_scales

    def wants_distillation(self) -> bool:
        """Whether a model-level distillation stage follows the layer-wise quantization."""
        return self.distill


@dataclass
class PBLLMConfig(QuantConfig):
    """PB-LLM (Shang et al.): a salient fraction kept at ``salient_bits``, the rest binarized."""

    method: ClassVar[str] = "pb-llm"
    salient_frac: float = 0.1
    salient_metric: str = "hessian"  # "hessian": w² / [H⁻¹]ⱼⱼ², or "magnitude": |w|
    salient_bits: int = 8
    refit_scales: bool = True  # the scale refit stage (QuantConfig), on by default for PB-LLM
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

    def wants_refit(self) -> bool:
        return self.refit_scales and self.salient_frac < 1  # all weights salient: no binarized scale to refit


_KINDS = {"bool": ((bool,), "true or false"), "int": ((int,), "an integer"),
          "float": ((int, float), "a number"), "str": ((str,), "a string"),
          "list": ((list,), "a list of rules, e.g. [{match: mlp.down_proj, planes: 2}]")}


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
    """DB-LLM (Chen et al.) flexible dual binarization: ``ŵ = μ + α₁b₁ + α₂b₂`` per row or group;
    its deviation-aware distillation of the scales and norms is the ``distill`` stage (QuantConfig)."""

    method: ClassVar[str] = "db-llm"
    planes: int = 2  # binary planes per weight: 2 is FDB; 1 is a sign code μ + α·s, below 2 bits with groups
    group_size: int = 0  # 0: scales per output row
    refine_iters: int = 20  # alternating least-squares rounds of the scales and planes
    refit_scales: bool = True  # the scale refit stage (QuantConfig), on by default for DB-LLM

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.planes <= 4:
            raise LlmbinError(f"--planes must be 1 to 4, got {self.planes}")
        if self.group_size < 0:
            raise LlmbinError(f"--group-size must be 0 (per row) or positive, got {self.group_size}")
        if self.refine_iters < 0:
            raise LlmbinError(f"--refine-iters must be >= 0, got {self.refine_iters}")


@dataclass
class BiLLMConfig(QuantConfig):
    """BiLLM (Huang et al.): per block, salient columns get residual (two-plane) binarization,
    the other weights split at a searched magnitude break-point into two binarized classes.
    ARB-LLM-X (Li et al.) is this with ``refine_iters: 15`` and ``refit_scales: true``
    (``recipes/arb-x.yaml``)."""

    method: ClassVar[str] = "billm"
    salient_metric: str = "hessian"
    max_salient_columns: int = 30  # the salient column count is searched in [1, this] per block
    split_points: int = 81  # break-point candidates: this many quantiles of |w| from 10 % to 90 %
    refine_iters: int = 0  # ARB alternating refinement rounds (0: BiLLM's closed form)

    def validate(self) -> None:
        super().validate()
        if self.salient_metric not in ("hessian", "magnitude"):
            raise LlmbinError(f"--salient-metric must be 'hessian' or 'magnitude', got {self.salient_metric!r}")
        if self.max_salient_columns < 0 or self.split_points < 1 or self.refine_iters < 0:
            raise LlmbinError("--max-salient-columns and --refine-iters must be >= 0, --split-points >= 1")


@dataclass
class ARBRCConfig(BiLLMConfig):
    """ARB-LLM-RC (Li et al.): BiLLM's structure with row and column scales ``α_r·β_c`` (no mean),
    refined alternately."""

    method: ClassVar[str] = "arb-rc"
    refine_iters: int = 15


# --- the methods, by name (torch-free: the command line builds its options and checks them from here) ---

# Former method names that are recipes now: name -> (method, the options its recipe sets). Checkpoints
# and run records written before say ``method: arb-x``; ``config_from_dict`` reads them as the recipe.
RECIPE_METHODS: dict[str, tuple[str, dict]] = {
    "arb-x": ("billm", {"refine_iters": 15, "refit_scales": True}),
}


def method_configs() -> list[type[QuantConfig]]:
    """Every method's config class: each subclass of ``QuantConfig`` that names a method."""
    found = []

    def walk(cls):
        for sub in cls.__subclasses__():
            if sub.method and sub not in found:
                found.append(sub)
            walk(sub)

    walk(QuantConfig)
    return found


def available_methods() -> list[str]:
    return sorted(cls.method for cls in method_configs())


def make_config(method: str, **options) -> QuantConfig:
    """Build and validate a config from a method name and options (unknown options are errors)."""
    if method in RECIPE_METHODS:
        base, preset = RECIPE_METHODS[method]
        settings = ", ".join(f"{k} {str(v).lower()}" for k, v in preset.items())
        raise LlmbinError(f"{method} is a recipe now, not a method: use --recipe {method} (recipes/{method}.yaml), "
                          f"or method {base} with {settings}")
    classes = {cls.method: cls for cls in method_configs()}
    if method not in classes:
        raise LlmbinError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
    cls = classes[method]
    unknown = sorted(set(options) - set(config_fields(cls)))
    if unknown:
        raise LlmbinError(f"unknown option(s) for {method}: {', '.join(unknown)}; valid: {', '.join(config_fields(cls))}")
    config = cls(**options)
    config.validate()
    return config


def config_from_dict(data: dict) -> QuantConfig:
    """Inverse of ``QuantConfig.to_dict``; also reads the records of earlier versions (a method that is
    a recipe now, e.g. ``arb-x``, becomes its recipe's method and options; options added since take
    their defaults)."""
    data = dict(data)
    method = data.pop("method", "")
    if method in RECIPE_METHODS:
        method, preset = RECIPE_METHODS[method]
        data = {**preset, **data}
    return make_config(method, **data)


# One line of help per option, for ``llmbin quantize --help`` (which adds the methods that have the
# option and their defaults, read from the classes above), keyed by field name so that a field can
# move between classes without its help. tests/test_cli_help.py checks that every field has one.
SALIENT_METRICS = ("hessian", "magnitude")
OPTION_CHOICES = {"rotate": ROTATE_CHOICES, "salient_metric": SALIENT_METRICS, "embedding_bits": EMBEDDING_BITS}
OPTION_HELP = {
    "percdamp": "GPTQ damping: this fraction of the Hessian's mean diagonal is added to its diagonal",
    "blocksize": "GPTQ columns quantized per lazy-update block",
    "rotate": "incoherence processing: rotate each layer's input side, or both sides, by random orthogonal "
              "transforms before quantizing (llmbin.algorithms.incoherence)",
    "rotate_seed": "seed of the random rotations (with --rotate input or both)",
    "refit_scales": "after the method's fit, re-solve the scales for least Hessian-weighted error",
    "tune": "after each block's layer-wise pass, tune its scales, norms and biases so the block's outputs follow "
            "the float model's (signs and positions stay fixed; llmbin.block_tuning)",
    "tune_steps": "with --tune: Adam steps per block",
    "tune_batch": "with --tune: calibration windows per step",
    "tune_lr": "with --tune: Adam step size, relative to each tuned tensor's mean magnitude",
    "e2e_steps": "after every block is quantized (and tuned), Adam steps of one calibration window each that tune "
                 "the same tensors as --tune in all blocks, and the final norm, against the float model's next-token "
                 "distribution (KL; llmbin.e2e_tuning; 0: off; holds the packed model whole for the pass)",
    "e2e_lr": "with --e2e-steps: Adam step size, relative to each tuned tensor's mean magnitude",
    "distill": "after quantizing, tune the scales and norms against the float model's outputs (loads the model whole)",
    "distill_epochs": "with --distill: passes over the calibration windows",
    "distill_lr": "with --distill: learning rate",
    "salient_frac": "fraction of the weights kept at --salient-bits; the rest are binarized",
    "salient_metric": "how salient weights are ranked: hessian (w^2 / [H^-1]_jj^2) or magnitude (|w|)",
    "salient_bits": "bits of the salient weights (2 to 8)",
    "scale_search": "GPTQ passes with the scale multiplied by 0.5 to 1, each row keeping its best (0 or 1: one pass)",
    "order_search": "reconstruct again in activation order (GPTQ's desc_act) and keep the order with less layer error",
    "bits": "bits per weight of the uniform grid (2 to 8)",
    "planes": "binary planes per weight (2^planes levels with free scales; 1: a sign code, with --group-size below 2 bits)",
    "group_size": "input columns that share scales (0: one set per output row)",
    "refine_iters": "alternating refinement rounds of the scales and sign planes (0: the closed form only)",
    "max_salient_columns": "the salient column count is searched in [1, this] per block",
    "split_points": "break-point candidates: this many quantiles of |w| from 10 % to 90 %",
    "embedding_bits": "the token embedding and the output matrix (lm_head): 16 keeps them in fp16, 8 or 4 stores "
                      "them as integer codes with fp16 group scales",
    "embedding_group_size": "with --embedding-bits 8 or 4: columns that share one scale",
    "layers": "per-layer rules, a YAML list such as '[{match: mlp.down_proj, planes: 2}]': a linear whose module "
              "name contains a match of a rule's regex takes the first such rule's options",
}
