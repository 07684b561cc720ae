"""`as_peft_model(model)`: a trilora-adapted model seen as a genuine `peft.PeftModel`.

Some of the ecosystem decides what to do by `isinstance(model, PeftModel)` — accelerate's
`is_peft_model`, TRL's DPO/GRPO/KTO trainers (with a PEFT model they take the reference
log-probs from the same weights, through `disable_adapter()` or a frozen "ref" adapter copy,
instead of loading a second full model), transformers' Trainer (saving and resuming through
the adapter). A trilora model cannot be a PeftModel subclass (the two class hierarchies have
no consistent MRO), so this is a thin view instead: a `PeftModel` subclass whose
`base_model.model` *is* the trilora model — no copy, the same parameters under PEFT's own
names (`base_model.model.<module>.lora_A.<adapter>.weight`) — and whose PEFT methods
(`peft_config`, `active_adapter`, `set_adapter`, `add_adapter`, `disable_adapter`,
`save_pretrained`, `load_adapter`, `merge_and_unload`, …) answer from trilora's adapters.
PEFT's own LoRA layers are never built, so the model keeps trilora's fused forward.

    model = add_lora(base, LoraConfig(...))
    trainer = DPOTrainer(model=as_peft_model(model), ref_model=None, ...)  # no second model
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from .inject import active_adapter, adapter_configs


def _peft_config(config):
    """peft.LoraConfig equal to trilora's `config` (the adapter_config.json PEFT would read)."""
    import peft
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    data = {k: v for k, v in config.to_peft_dict().items() if k in fields}
    data["inference_mode"] = False  # a live adapter (its file says True: PEFT loads files frozen)
    return peft.LoraConfig(**data)


class _Tuner(nn.Module):
    """Stands where PEFT keeps its LoraModel: `.model` is the trilora model, attribute reads
    it lacks go there (as LoraModel's do)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def peft_config(self) -> dict:
        return {name: _peft_config(cfg) for name, cfg in adapter_configs(self.model).items()}

    @property
    def active_adapter(self) -> str:
        return active_adapter(self.model)

    @property
    def active_adapters(self) -> list[str]:
        return [active_adapter(self.model)]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def as_peft_model(model: nn.Module):
    """A `peft.PeftModel` view of `model` (adapted by trilora's `add_lora` / `load_adapter`):
    see the module docstring. Raises ValueError for a model without trilora adapters."""
    if not adapter_configs(model):
        raise ValueError("as_peft_model needs a model with trilora adapters (add_lora or load_adapter first)")
    return _view_class()(model)


_VIEW: list[type] = []


def _view_class() -> type:
    """TriloraPeftModel, built on first use so that importing trilora never imports peft."""
    if _VIEW:
        return _VIEW[0]
    from peft import PeftModel

    class TriloraPeftModel(PeftModel):
        """A PeftModel whose tuner is trilora's adapter layer (see `as_peft_model`)."""

        def __init__(self, model: nn.Module):
            nn.Module.__init__(self)  # not PeftModel.__init__: it would build PEFT's own layers
            self.base_model = _Tuner(model)
            self.special_peft_forward_args = {"adapter_names"}
            self._is_prompt_learning = False
            self._adapters_disabled = False

        # --- what PEFT's properties read from its tuner
        peft_config = property(lambda self: self.base_model.peft_config)
        active_adapter = property(lambda self: self.base_model.active_adapter)
        active_adapters = property(lambda self: self.base_model.active_adapters)
        active_peft_config = property(lambda self: self.peft_config[self.active_adapter])
        @property
        def modules_to_save(self) -> set[str] | None:
            names = self.active_peft_config.modules_to_save
            return set(names) if names else None

        @property
        def has_active_enabled_adapter(self) -> bool:
            from .layer import LoraLinear
            return any(m.runs_adapter for m in self.get_base_model().modules() if isinstance(m, LoraLinear))

        def get_base_model(self) -> nn.Module:
            return self.base_model.model

        def forward(self, *args, **kwargs):
            if kwargs.pop("adapter_names", None) is not None:
                raise ValueError("trilora runs one adapter per batch: mixed-batch adapter_names are not supported")
            return self.get_base_model()(*args, **kwargs)

        def generate(self, *args, **kwargs):
            return self.get_base_model().generate(*args, **kwargs)

        # --- PEFT's methods, answered by trilora's (hf_integration gives the model these)
        def disable_adapter(self):
            return self.get_base_model().disable_adapter()

        def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
            self.get_base_model().set_adapter(adapter_name, inference_mode=inference_mode)

        def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False,
                        autocast_adapter_dtype: bool = True) -> None:
            self.get_base_model().add_adapter(adapter_name, peft_config)

        def delete_adapter(self, adapter_name: str) -> None:
            self.get_base_model().delete_adapter(adapter_name)

        def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, **kwargs):
            self.get_base_model().load_adapter(model_id, adapter_name, is_trainable=is_trainable)

        def add_weighted_adapter(self, *args, **kwargs) -> None:
            self.get_base_model().add_weighted_adapter(*args, **kwargs)

        def save_pretrained(self, save_directory, safe_serialization: bool = True, selected_adapters=None,
                            is_main_process: bool = True, **kwargs) -> None:
            self.get_base_model().save_pretrained(save_directory, safe_serialization=safe_serialization,
                                                  selected_adapters=selected_adapters,
                                                  is_main_process=is_main_process, resume_file=False)

        def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
            if adapter_names is not None:
                self.set_adapter(adapter_names)
            return self.get_base_model().merge_and_unload(safe_merge=safe_merge)

        def get_nb_trainable_parameters(self) -> tuple[int, int]:
            return self.get_base_model().get_nb_trainable_parameters()

        def print_trainable_parameters(self) -> None:
            self.get_base_model().print_trainable_parameters()

    _VIEW.append(TriloraPeftModel)
    return TriloraPeftModel


__all__ = ["as_peft_model"]
