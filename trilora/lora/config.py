"""`LoraConfig`: what to adapt and how, and its PEFT `adapter_config.json` form.

Field names are short (`alpha`, `dropout`); the JSON uses PEFT's names
(`lora_alpha`, `lora_dropout`) so `peft.PeftModel.from_pretrained` reads our adapters and we
read PEFT's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
# init_lora_weights values we implement. PEFT's other schemes (pissa, olora, loftq, corda, eva…)
# rewrite the base weights or need data, so an adapter trained with them is not a plain LoRA delta.
INIT_SCHEMES = (True, False, "gaussian")
# PEFT adds these to modules_to_save for SEQ_CLS and TOKEN_CLS models (the randomly initialised
# head must train and be saved).
SEQ_CLS_HEADS = ("classifier", "score")
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")
# PEFT's default target_modules per model_type (peft.utils.constants), for the architectures
# trilora is tested on. Others must name target_modules, as in PEFT.
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
}


@dataclass
class LoraConfig:
    """LoRA hyper-parameters: `y = base(x) + scaling · B A dropout(x)`.

    Args:
        r: rank (≥ 1). A rank above min(in, out) of a layer is allowed (PEFT allows it) but
            warned about: it adds parameters without adding expressiveness.
        alpha: `lora_alpha`; scaling = alpha / r, or alpha / √r with `use_rslora`.
        dropout: dropout probability on the LoRA branch's input, in [0, 1).
        target_modules: a list (a module matches when its dotted name equals an entry or
            ends with "." + entry), a string (a regex that must match the full name), or
            "all-linear" (every linear layer except the output head). None: PEFT's default
            for the model type (`DEFAULT_TARGET_MODULES`).
        bias: "none", "all" (every bias trains) or "lora_only" (biases of adapted layers).
        use_rslora: rank-stabilised scaling alpha / √r.
        task_type: PEFT task type; "SEQ_CLS" and "TOKEN_CLS" put the classifier head
            ("classifier" / "score") in `modules_to_save`.
        modules_to_save: modules trained in full (as a trainable copy) and saved with the
            adapter; PEFT matches them by name suffix.
        fan_in_fan_out: the base stores W as [in, out] (GPT-2 `Conv1D`); auto-detected per layer.
        init_lora_weights: True = PEFT's default (A ~ kaiming_uniform(a=√5), B = 0), "gaussian"
            (A ~ N(0, 1/r²), B = 0), False = both random like nn.Linear (not a no-op at start).
        base_model_name_or_path: written to the adapter config; filled from the model if None.
        use_dora: DoRA (weight-decomposed LoRA): a trained magnitude per output row rescales
            W + s·BA to m ⊙ (W + s·BA) / ‖W + s·BA‖_row, as PEFT's `use_dora=True`.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    task_type: str | None = "CAUSAL_LM"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None
    use_dora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            # alpha = 0 makes the adapter a no-op that trains nothing (its gradients are 0)
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if self.init_lora_weights not in INIT_SCHEMES or isinstance(self.init_lora_weights, int) \
                and not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"init_lora_weights must be one of {INIT_SCHEMES}, got {self.init_lora_weights!r} "
                             "(PEFT's pissa/olora/loftq/corda/eva initialisations are not supported)")
        tm = self.target_modules
        if tm is not None:
            if isinstance(tm, str):
                if not tm:
                    raise ValueError("target_modules must not be an empty string")
            elif isinstance(tm, (list, tuple, set, frozenset)) and tm and all(isinstance(t, str) and t for t in tm):
                self.target_modules = sorted(set(tm))
            else:
                raise ValueError(f"target_modules must be a regex string, 'all-linear' or a non-empty list of "
                                 f"module names, got {tm!r}")
        if self.modules_to_save is not None:
            mts = self.modules_to_save
            if isinstance(mts, str) or not all(isinstance(m, str) and m for m in mts):
                raise ValueError(f"modules_to_save must be a list of module names, got {mts!r}")
            self.modules_to_save = list(dict.fromkeys(mts))

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / √r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear"

    def resolved_modules_to_save(self) -> list[str] | None:
        """modules_to_save with the SEQ_CLS / TOKEN_CLS heads added, as PEFT does."""
        mts = list(self.modules_to_save or [])
        if self.task_type in HEAD_TASK_TYPES:
            mts += [h for h in SEQ_CLS_HEADS if h not in mts]
        return mts or None

    def copy(self, **changes) -> "LoraConfig":
        return replace(self, **changes)

    # ------------------------------------------------------------------ PEFT JSON

    def to_peft_dict(self) -> dict:
        """The `adapter_config.json` content: PEFT's field names, and PEFT's neutral values for
        the features trilora does not implement (so PEFT builds exactly this adapter)."""
        tm = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(tm) if isinstance(tm, (list, tuple, set)) else tm,
            "exclude_modules": None,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "modules_to_save": self.modules_to_save,
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": self.init_lora_weights,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "lora_bias": False,
            "target_parameters": None,
            "trainable_token_indices": None,
            "layer_replication": None,
        }

    @classmethod
    def from_peft_dict(cls, data: dict) -> "LoraConfig":
        """Parse an `adapter_config.json` dict. Raises ValueError for another PEFT method or for
        a LoRA variant trilora does not implement (DoRA, rank/alpha patterns, …), naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"adapter_config.json must hold a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            raise ValueError(f"adapter_config.json has peft_type {peft_type!r}; trilora loads only 'LORA' adapters")
        unsupported = {k: v for k, v in data.items()
                       if k not in _IMPLEMENTED and k not in _IGNORED and v not in (None, False, {}, [], "")}
        if unsupported:
            hints = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
                     "layers_to_transform": "layer selection", "exclude_modules": "exclude_modules",
                     "lora_bias": "LoRA bias on lora_B", "trainable_token_indices": "trainable tokens"}
            what = ", ".join(f"{k}={v!r}" + (f" ({hints[k]})" if k in hints else "") for k, v in unsupported.items())
            raise ValueError(f"this adapter uses LoRA features trilora does not implement: {what}")
        init = data.get("init_lora_weights", True)
        if init in _DELTA_ONLY_INITS:
            init = True  # only A/B were initialised differently: the saved adapter is a plain delta
        if init not in INIT_SCHEMES:
            raise ValueError(f"adapter was initialised with init_lora_weights={init!r}, which rewrites the base "
                             "weights; convert it to a plain LoRA adapter first (PEFT's "
                             "path_initial_model_for_weight_conversion)")
        for key in ("r", "lora_alpha"):
            if key not in data:
                raise ValueError(f"adapter_config.json lacks '{key}'")
        return cls(r=data["r"], alpha=data["lora_alpha"], dropout=data.get("lora_dropout", 0.0),
                   target_modules=data.get("target_modules"), bias=data.get("bias", "none"),
                   use_rslora=bool(data.get("use_rslora", False)), task_type=data.get("task_type"),
                   modules_to_save=data.get("modules_to_save"),
                   fan_in_fan_out=bool(data.get("fan_in_fan_out", False)), init_lora_weights=init,
                   base_model_name_or_path=data.get("base_model_name_or_path"),
                   use_dora=bool(data.get("use_dora", False)))


# PEFT initialisations that set A/B only (pissa, olora, corda, loftq, lora_ga, mica also rewrite
# the base weights, so their adapters do not apply to the original base).
_DELTA_ONLY_INITS = ("eva", "orthogonal")
_IMPLEMENTED = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora",
                "task_type", "modules_to_save", "fan_in_fan_out", "init_lora_weights",
                "base_model_name_or_path", "use_dora"}
# Metadata, and options that only shape initialisation or training (not the function the
# saved weights compute), so a non-default value does not change what we load.
_IGNORED = {"revision", "inference_mode", "auto_mapping", "peft_version", "megatron_core",
            "layers_pattern", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
            "qalora_group_size", "runtime_config"}

__all__ = ["LoraConfig", "DEFAULT_TARGET_MODULES", "BIAS_MODES", "SEQ_CLS_HEADS"]
