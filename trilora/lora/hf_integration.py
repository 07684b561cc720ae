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
- Several named adapters, as PEFT's and transformers' methods name them (`add_adapter`,
  `load_adapter`, `set_adapter`, `delete_adapter`, `add_weighted_adapter`, `active_adapter(s)`,
  see `adapters.py`), instead of transformers' integration failing with a PEFT version error.
"""
from __future__ import annotations

import contextlib
import os
from types import MethodType

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .inject import DEFAULT_ADAPTER as ADAPTER_NAME
from .inject import lora_backend


def install(model: nn.Module) -> nn.Module:
    """Give `model` (an adapted HF model) the PEFT-shaped surface described above; returns it."""
    for name, fn in _METHODS.items():
        setattr(model, name, MethodType(fn, model))
    from .inject import active_adapter
    model.active_adapters = [active_adapter(model)]   # PEFT's property; transformers' Trainer reads it
    model.active_adapter = active_adapter(model)
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
                    safe_serialization: bool = True, selected_adapters: list[str] | None = None,
                    resume_file: bool = True, **kwargs) -> None:
    """Write the adapters (PEFT's format: "default" in `save_directory`, any other adapter in
    `save_directory/<name>`, as PEFT lays them out) and, for HF Trainer's resume, the
    trainable tensors as `model.safetensors` under the model's own keys (`resume_file=False`:
    not; the PEFT view saves without it, as Trainer resumes a PeftModel through
    `load_adapter`). `state_dict` (HF Trainer passes the whole model's) is only read for
    those trainable tensors."""
    from .inject import adapter_configs
    from .peft_format import save_adapter

    if not is_main_process:
        return
    if not safe_serialization:
        raise ValueError("trilora writes safetensors only (no pickle): save with safe_serialization=True")
    names = list(adapter_configs(self)) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in adapter_configs(self)]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} are not adapters of this model ({list(adapter_configs(self))})")
    os.makedirs(save_directory, exist_ok=True)
    for name in names:
        where = save_directory if name == ADAPTER_NAME else os.path.join(os.fspath(save_directory), name)
        save_adapter(self, where, adapter_name=name)
    if not resume_file:
        return
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
    from .peft_format import adapter_state_dict
    return adapter_state_dict(self, adapter_name)


def set_adapter_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
    """Load tensors keyed as in PEFT's file (`set_peft_model_state_dict`), every key checked."""
    from .peft_format import PREFIX
    from .peft_format import _adapter_tensors
    targets = {PREFIX + k: v for k, v in _adapter_tensors(self, adapter_name).items()}
    unknown = sorted(set(state_dict) - set(targets))
    if unknown:
        raise ValueError(f"adapter state dict keys this model's adapter lacks: {unknown[:4]}")
    for key, value in state_dict.items():
        if targets[key].shape != value.shape:
            raise ValueError(f"{key}: shape {list(value.shape)}, the adapter has {list(targets[key].shape)}")
    with torch.no_grad():
        for key, value in state_dict.items():
            targets[key].copy_(value)


# ----------------------------------------------------------------------------- several adapters

def _adapter_config(config):
    """A trilora LoraConfig from ours or PEFT's (`peft.LoraConfig`, via its JSON form)."""
    from .config import LoraConfig
    if isinstance(config, LoraConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in to_dict().items()}
        return LoraConfig.from_peft_dict(data)
    raise TypeError(f"adapter config must be a trilora.lora.LoraConfig or a peft.LoraConfig, got {type(config).__name__}")


def add_adapter(self, *args, **kwargs) -> None:
    """Add a fresh adapter beside the others, frozen and inactive until `set_adapter`.
    Takes PEFT's order `(adapter_name, config)` and transformers' `(config, adapter_name)`."""
    from .inject import add_lora
    name = kwargs.pop("adapter_name", None)
    config = kwargs.pop("peft_config", None) or kwargs.pop("adapter_config", None)
    for arg in args:
        if isinstance(arg, str):
            name = arg
        else:
            config = arg
    if config is None:
        raise ValueError("add_adapter needs a LoraConfig (trilora's or PEFT's)")
    add_lora(self, _adapter_config(config), backend=lora_backend(self), adapter_name=name or ADAPTER_NAME)


def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
    from .adapters import set_adapter as _set
    _set(self, adapter_name, trainable=not inference_mode)


def delete_adapter(self, adapter_name: str) -> None:
    from .adapters import delete_adapter as _delete
    _delete(self, adapter_name)


def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str = "svd",
                         svd_rank: int | None = None, **kwargs) -> None:
    from .adapters import add_weighted_adapter as _combine
    unsupported = {k: v for k, v in kwargs.items() if v not in (None, True, "total")}
    if unsupported:
        raise ValueError(f"add_weighted_adapter options trilora does not implement: {sorted(unsupported)}")
    _combine(self, list(adapters), list(weights), adapter_name, combination_type, svd_rank)


def load_adapter(self, path, adapter_name: str | None = None, is_trainable: bool = False, **kwargs) -> None:
    """PEFT's / transformers' `load_adapter`: into an existing adapter of that name, its
    values are replaced (HF Trainer's resume calls this); a new name adds the adapter."""
    from .inject import adapter_configs
    from .peft_format import load_adapter as _load
    from .peft_format import load_adapter_weights
    name = adapter_name or ADAPTER_NAME
    if name in adapter_configs(self):
        load_adapter_weights(self, path, name)  # values only: the adapter stays as trainable as it was
    else:
        _load(self, path, backend=lora_backend(self), is_trainable=is_trainable, adapter_name=name)


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
    "delete_adapter": delete_adapter,
    "add_weighted_adapter": add_weighted_adapter,
}

__all__ = ["install", "uninstall", "ADAPTER_NAME"]
