"""Fold adapters into the base weights: `merge_lora`, `unmerge_lora`, `save_merged`.

W' = W + scaling · B A (DoRA: m ⊙ (W + s·BA) / ‖W + s·BA‖_row, as PEFT merges it) is computed
in fp32 and rounded once to the base weight's dtype. A
4-bit base is dequantized to the dtype it was quantized from (`quant_state.dtype`), so the
merged layer is dense; `requantize=True` quantizes W' again with the same settings, which
adds a fresh quantization error on top of the trained weights: opt-in only.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from trilora.quant import Linear4bit, dequantize_4bit

from ..module_tree import replace_module
from .inject import ACTIVE_ATTR, CONFIG_ATTR, get_lora_config, lora_backend, lora_layers
from .layer import LoraLinear, TrainableCopy


@torch.no_grad()
def _fold(layer: LoraLinear, sign: float) -> None:
    """The active adapter folded into (+1) or taken out of (−1) the dense base weight, in place."""
    w = layer.base_layer.weight
    dense = w.float().t() if layer.fan_in_fan_out else w.float()   # [out, in] (Conv1D stores [in, out])
    new = layer.merged_weight(dense) if sign > 0 else layer.unmerged_weight(dense)
    w.copy_((new.t() if layer.fan_in_fan_out else new).to(w.dtype))
    layer.forget_base_norm()  # the DoRA norm's cached ‖W‖² was of the weight before


def _dense_from_4bit(base: Linear4bit, layer: LoraLinear | None, backend: str) -> nn.Linear:
    """nn.Linear in the quant state's dtype holding dequant(W), with `layer`'s active adapter
    folded in when given; the bias reused."""
    dtype = base.quant_state.dtype
    weight = dequantize_4bit(base.weight, base.quant_state, torch.float32, backend=backend)
    if layer is not None:
        weight = layer.merged_weight(weight)
    dense = nn.Linear(base.in_features, base.out_features, bias=False, device=weight.device, dtype=dtype)
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    dense.bias = base.bias  # same Parameter (and requires_grad) as before
    return dense


def merge_lora(model: nn.Module, requantize: bool = False, unload: bool = True) -> nn.Module:
    """Fold the active adapter of `model` into its base weights, in place; returns `model`.
    With unload=True the other adapters (if several) are dropped, as PEFT's merge_and_unload.

    unload=True (default): each LoraLinear is replaced by its base module type again
    (nn.Linear / Conv1D; a Linear4bit base becomes a dense nn.Linear in the quant state's
    dtype, or a re-quantized Linear4bit with `requantize=True`), modules_to_save wrappers by
    their trained copy: the result is the plain HF model, same logits up to rounding.
    unload=False: fold into dense bases but keep the adapters (`unmerge_lora` undoes it); a
    4-bit base raises ValueError (folding into 4 bits cannot be undone exactly).
    """
    layers = list(lora_layers(model))
    if not layers and get_lora_config(model) is None:
        raise ValueError("model has no trilora adapters to merge")
    if not unload:
        if requantize:
            raise ValueError("requantize=True needs unload=True (a merged 4-bit layer is a new layer)")
        _refuse_4bit(layers, "cannot merge into a 4-bit base and keep the adapters ({}, ...): use "
                             "merge_lora(model, unload=True) for a dense (or requantize=True) model")
        return _set_merged(model, layers, True)

    for name, layer in layers:
        base = layer.base_layer
        holds_active = layer.active_adapter in layer.lora_A  # else the active adapter skips this layer
        if isinstance(base, Linear4bit):
            new = _dense_from_4bit(base, layer if holds_active else None, layer.backend)
            if requantize:
                new = Linear4bit.from_linear(new, base.quant_type, base.blocksize, base.double_quant,
                                             base.compute_dtype, backend=layer.backend)
        else:
            if not layer.merged and holds_active:
                _fold(layer, +1.0)
            new = base
        replace_module(model, name, new)
    for name, wrapper in [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableCopy)]:
        replace_module(model, name, wrapper.trained)
    for attr in (CONFIG_ATTR, ACTIVE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    from .hf_integration import uninstall
    return uninstall(model)  # a plain HF model again: save_pretrained writes the whole model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract the adapters that `merge_lora(model, unload=False)` folded in; returns `model`.

    Raises ValueError when the model has no adapters left (merge_lora with unload=True
    removed them) or an adapter sits on a 4-bit base (it was never folded).
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers to unmerge (merge_lora(unload=True) removes them)")
    _refuse_4bit(layers, "cannot unmerge a 4-bit base ({}): adapters on 4-bit layers are never folded in place")
    return _set_merged(model, layers, False)


def _refuse_4bit(layers, message: str) -> None:
    quantized = [n for n, layer in layers if isinstance(layer.base_layer, Linear4bit)]
    if quantized:
        raise ValueError(message.format(repr(quantized[0])))


def _set_merged(model: nn.Module, layers, merged: bool) -> nn.Module:
    """Fold (merged=True) or take out (False) each layer's active adapter where it is not yet so."""
    for _, layer in layers:
        if layer.merged != merged and layer.active_adapter in layer.lora_A:
            _fold(layer, 1.0 if merged else -1.0)
            layer.merged = merged
    return model


def save_merged(model: nn.Module, path: str | os.PathLike, in_place: bool = False) -> str:
    """Save `model` with its adapters merged as a plain HF model directory (safetensors).

    `AutoModelFor….from_pretrained(path)` loads it with the same logits. A model that
    `merge_lora` already merged is saved as it is. Any 4-bit layer is
    saved dense (in its quant state's dtype), since HF can only reload bitsandbytes
    checkpoints through bitsandbytes' own loader. in_place=False (default) merges a deep copy
    and leaves `model` adapted (costs one model's memory); True merges `model` itself.
    """
    backend = lora_backend(model)
    merged = model if in_place else copy.deepcopy(model)
    if get_lora_config(merged) is not None or any(True for _ in lora_layers(merged)):
        merge_lora(merged)  # else: merged already (merge_lora, then save_merged) — just save
    for name, module in [(n, m) for n, m in merged.named_modules() if isinstance(m, Linear4bit)]:
        replace_module(merged, name, _dense_from_4bit(module, None, backend))
    for name, tensor in merged.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"the merged weight {name} holds NaN/Inf values (from the base or the adapter): "
                             "refusing to save a broken model")
    path = os.fspath(path)
    merged.save_pretrained(path)
    if not os.path.isfile(os.path.join(path, "model.safetensors")) and \
            not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file to {path!r}")
    return path


__all__ = ["merge_lora", "unmerge_lora", "save_merged"]
