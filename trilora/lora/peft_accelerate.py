"""One call to speed up a model built by PEFT: `accelerate_peft(peft_model)`.

PEFT's LoRA layer computes `base(x) + B(A(dropout(x))) · s` as three separate GEMMs (and,
over a bitsandbytes 4-bit base, a dequantization into a fresh buffer every call). This swaps
the forward of each of its LoRA layers, in place, for trilora's fused `lora_linear` op,
reading the very same Parameters:

- nothing is copied or renamed: parameter identity (the optimizer's state), `state_dict`
  keys and PEFT's saving (`save_pretrained`, `get_peft_model_state_dict`) are unchanged;
- a bitsandbytes `Linear4bit` base is read in place: its packed NF4/FP4 bytes and quant
  state are bitsandbytes' format, which trilora's kernels read natively;
- what PEFT features the fused op does not cover make a layer keep PEFT's forward, listed in
  the returned report: DoRA, LoRA bias, several active adapters, mixed-batch adapter_names,
  a merged or disabled adapter (checked at each call, so `disable_adapter()` still works),
  bases other than nn.Linear / Conv1D / bnb Linear4bit.
`restore_peft(model)` puts PEFT's forwards back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MethodType

import torch
import torch.nn as nn

from trilora import kernels
from trilora.quant import QuantState


@dataclass
class AccelerateReport:
    """converted: layer names now fused; kept: (layer name, why PEFT's forward stays)."""
    converted: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"trilora.accelerate_peft: {len(self.converted)} LoRA layers fused, {len(self.kept)} kept as PEFT's"]
        lines += [f"  kept {name}: {why}" for name, why in self.kept]
        return "\n".join(lines)


def accelerate_peft(model: nn.Module, backend: str = "auto") -> AccelerateReport:
    """Fuse every PEFT LoRA layer of `model` (a PeftModel, or the model inside one) in place."""
    from peft.tuners.lora import LoraLayer

    report = AccelerateReport()
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or not isinstance(layer, nn.Module):
            continue
        why = _unsupported(layer)
        if why:
            report.kept.append((name, why))
            continue
        if not hasattr(layer, "_trilora_peft_forward"):
            layer._trilora_peft_forward = layer.forward
        layer._trilora_backend = backend
        layer.forward = MethodType(_fused_forward, layer)
        report.converted.append(name)
    if not report.converted and not report.kept:
        raise ValueError("no PEFT LoRA layer in this model: accelerate_peft takes a model built by "
                         "peft.get_peft_model or PeftModel.from_pretrained")
    return report


def restore_peft(model: nn.Module) -> nn.Module:
    """PEFT's own forwards again."""
    for layer in model.modules():
        if hasattr(layer, "_trilora_peft_forward"):
            layer.forward = layer._trilora_peft_forward
            del layer._trilora_peft_forward
    return model


def _unsupported(layer) -> str | None:
    base = layer.get_base_layer()
    if _base_kind(base) is None:
        return f"base layer {type(base).__name__} (fused: nn.Linear, Conv1D, bitsandbytes Linear4bit)"
    if any(getattr(layer, "use_dora", {}).values()):
        return "DoRA"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "LoRA bias"
    return None


def _base_kind(base: nn.Module) -> str | None:
    from transformers.pytorch_utils import Conv1D
    if type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes"):
        return "bnb4"
    if isinstance(base, Conv1D):
        return "conv1d"
    if type(base) is nn.Linear:
        return "linear"
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoraLayer.forward, fused; PEFT's own path where it must decide."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or args or kwargs.get("adapter_names") is not None or len(active) != 1:
        return self._trilora_peft_forward(x, *args, **kwargs)
    name = active[0]
    base = self.get_base_layer()
    kind = _base_kind(base)
    if kind == "bnb4":
        dtype = base.compute_dtype or x.dtype
        weight, quant_state = base.weight.data, _quant_state(self, base)
    else:
        dtype = x.dtype
        weight = (base.weight.t() if kind == "conv1d" else base.weight).to(dtype)
        quant_state = None
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
    bias = None if base.bias is None else base.bias.to(dtype)
    y = kernels.lora_linear(x.to(dtype), weight, self.lora_A[name].weight.to(dtype),
                            self.lora_B[name].weight.to(dtype), self.scaling[name], bias, p, quant_state,
                            backend=self._trilora_backend)
    return y.to(x.dtype)


def _quant_state(layer, base) -> QuantState:
    """trilora's view of a bitsandbytes weight's quant state (the same tensors, no copy), cached
    on the layer and rebuilt when the weight moves."""
    cached = getattr(layer, "_trilora_quant_state", None)
    if cached is not None and cached.device == base.weight.device:
        return cached
    qs = base.weight.quant_state
    nested = getattr(qs, "nested", False)
    state = QuantState(
        absmax=qs.absmax, shape=torch.Size(qs.shape), dtype=qs.dtype, blocksize=qs.blocksize,
        quant_type=qs.quant_type, code=qs.code.float(),
        nested_absmax=qs.state2.absmax.float() if nested else None,
        nested_code=qs.state2.code.float() if nested else None,
        offset=torch.as_tensor(qs.offset, dtype=torch.float32, device=qs.absmax.device) if nested else None,
        nested_blocksize=qs.state2.blocksize if nested else 256)
    layer._trilora_quant_state = state
    return state


__all__ = ["accelerate_peft", "restore_peft", "AccelerateReport"]
