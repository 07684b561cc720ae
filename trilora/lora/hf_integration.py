"""A trilora-adapted HF model behaves like a PEFT model where the ecosystem reaches it.

`add_lora` / `load_adapter` call `install(model)`, which gives the model instance:

- `save_pretrained(dir)` that writes the **adapter** (PEFT's adapter_config.json +
  adapter_model.safetensors), as a PEFT model does, wherever HF's saving path reaches it:
  `Trainer._save`, step checkpoints, TRL's trainers, `push_to_hub`. Beside it,
  `model.safetensors` holds the same trainable tensors under the model's own state-dict keys,
  so HF Trainer's `resume_from_checkpoint` / `load_best_model_at_end` (which load that file
  with strict=False) restore them exactly; the frozen base is listed in
  `_keys_to_ignore_on_save` so that this partial file is not reported as missing weights.
  No config.json is written: the directory is an adapter, not a model (transformers loads
  it as base + adapter through its PEFT integration, `PeftModel.from_pretrained` too).
- PEFT's methods: `disable_adapter()` (a context manager: exactly the base model's outputs,
  e.g. DPO's reference logits), `enable_adapter_layers()` / `disable_adapter_layers()`,
  `print_trainable_parameters()`, `get_nb_trainable_parameters()`, `merge_and_unload()`,
  `get_adapter_state_dict()` / `set_adapter_state_dict()`.
- The adapter methods transformers models carry (its PEFT integration: `load_adapter`,
  `set_adapter`, `active_adapters`, `add_adapter`, …) answer for trilora's single adapter
  named "default" instead of failing with a PEFT version error.
"""
from __future__ import annotations

import contextlib
import os
from types import MethodType

import torch
import torch.nn as nn
from safetensors.torch import save_file

ADAPTER_NAME = "default"


def install(model: nn.Module) -> nn.Module:
    """Give `model` (an adapted HF model) the PEFT-shaped surface described above; returns it."""
    for name, fn in _METHODS.items():
        setattr(model, name, MethodType(fn, model))
    model.active_adapters = [ADAPTER_NAME]   # PEFT's property; transformers' Trainer reads it
    model.active_adapter = ADAPTER_NAME
    model._keys_to_ignore_on_save = _frozen_keys(model)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Remove what `install` added (after merging the adapter away)."""
    for name in list(_METHODS) + ["active_adapters", "active_adapter", "_keys_to_ignore_on_save"]:
        model.__dict__.pop(name, None)
    return model


def _frozen_keys(model: nn.Module) -> list[str]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if k not in trainable]


# ----------------------------------------------------------------------------- saving

def save_pretrained(self, save_directory, *args, is_main_process: bool = True, state_dict=None,
                    safe_serialization: bool = True, **kwargs) -> None:
    """Write the adapter (PEFT's format) and, for HF Trainer's resume, the trainable tensors
    as `model.safetensors` under the model's own keys. `state_dict` (HF Trainer passes the
    whole model's) is only read for those trainable tensors."""
    from .peft_format import save_adapter

    if not is_main_process:
        return
    if not safe_serialization:
        raise ValueError("trilora writes safetensors only (no pickle): save with safe_serialization=True")
    os.makedirs(save_directory, exist_ok=True)
    save_adapter(self, save_directory)
    source = state_dict if state_dict is not None else self.state_dict()
    trainable = {n for n, p in self.named_parameters() if p.requires_grad}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in source.items() if k in trainable}
    self._keys_to_ignore_on_save = _frozen_keys(self)  # what a resume must not expect in that file
    save_file(tensors, os.path.join(os.fspath(save_directory), "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- PEFT's surface

@contextlib.contextmanager
def disable_adapter(self):
    """Within the block the model computes exactly its base model's outputs (LoRA layers and
    modules_to_save copies switched off), as `PeftModel.disable_adapter()` does."""
    layers = _switchable(self)
    previous = [layer.disabled for layer in layers]
    try:
        for layer in layers:
            layer.disabled = True
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def disable_adapter_layers(self) -> None:
    for layer in _switchable(self):
        layer.disabled = True


def enable_adapter_layers(self) -> None:
    for layer in _switchable(self):
        layer.disabled = False


def _switchable(model: nn.Module) -> list[nn.Module]:
    from .layer import LoraLinear, TrainableCopy
    return [m for m in model.modules() if isinstance(m, (LoraLinear, TrainableCopy))]


def get_nb_trainable_parameters(self) -> tuple[int, int]:
    from .inject import trainable_parameters
    return trainable_parameters(self)


def print_trainable_parameters(self) -> None:
    from .inject import trainable_summary
    print(trainable_summary(self))


def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False) -> nn.Module:
    """Fold the adapter into the base weights and return the plain model (PEFT's name)."""
    from .merge import merge_lora
    merge_lora(self)
    if safe_merge:
        bad = [n for n, p in self.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"merging produced NaN/Inf in {bad[:3]}")
    return uninstall(self)


def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as in PEFT's file (`get_peft_model_state_dict`)."""
    _only_default(adapter_name)
    from .peft_format import adapter_state_dict
    return adapter_state_dict(self)


def set_adapter_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
    """Load tensors keyed as in PEFT's file (`set_peft_model_state_dict`), every key checked."""
    _only_default(adapter_name)
    from .peft_format import PREFIX
    from .peft_format import _adapter_tensors
    targets = {PREFIX + k: v for k, v in _adapter_tensors(self).items()}
    unknown = sorted(set(state_dict) - set(targets))
    if unknown:
        raise ValueError(f"adapter state dict keys this model's adapter lacks: {unknown[:4]}")
    for key, value in state_dict.items():
        if targets[key].shape != value.shape:
            raise ValueError(f"{key}: shape {list(value.shape)}, the adapter has {list(targets[key].shape)}")
    with torch.no_grad():
        for key, value in state_dict.items():
            targets[key].copy_(value)


# ----------------------------------------------------------------------------- transformers' adapter methods

def _only_default(name: str | None) -> None:
    if name not in (None, ADAPTER_NAME):
        raise ValueError(f"trilora models carry one adapter, named {ADAPTER_NAME!r}; got {name!r}")


def load_adapter(self, path, adapter_name: str | None = None, is_trainable: bool = False, **kwargs) -> None:
    """Load a saved adapter's weights into this model's adapter (HF Trainer's resume calls this)."""
    _only_default(adapter_name)
    from .peft_format import load_adapter_weights
    load_adapter_weights(self, path)  # values only: the adapter stays as trainable as it was


def set_adapter(self, adapter_name) -> None:
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for name in names:
        _only_default(name)


def add_adapter(self, *args, **kwargs):
    raise ValueError("this model already carries a trilora adapter; one adapter system per model: "
                     "use trilora.lora (add_lora / load_adapter) on a fresh base, or PEFT alone")


_METHODS = {
    "save_pretrained": save_pretrained,
    "disable_adapter": disable_adapter,
    "disable_adapter_layers": disable_adapter_layers,
    "enable_adapter_layers": enable_adapter_layers,
    "disable_adapters": disable_adapter_layers,   # transformers' integration spells them so
    "enable_adapters": enable_adapter_layers,
    "get_nb_trainable_parameters": get_nb_trainable_parameters,
    "print_trainable_parameters": print_trainable_parameters,
    "merge_and_unload": merge_and_unload,
    "get_adapter_state_dict": get_adapter_state_dict,
    "set_adapter_state_dict": set_adapter_state_dict,
    "load_adapter": load_adapter,
    "set_adapter": set_adapter,
    "add_adapter": add_adapter,
}

__all__ = ["install", "uninstall", "ADAPTER_NAME"]
