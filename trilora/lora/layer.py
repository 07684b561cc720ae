"""`LoraLinear`: a frozen linear layer plus a trainable low-rank update, and `TrainableCopy`.

The forward is one call to `trilora.kernels.lora_linear`, so the layer runs whatever that op
dispatches to (fused Triton kernels on CUDA, the PyTorch reference on CPU) and picks up new
kernels without changes here.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from trilora import kernels
from trilora.quant import Linear4bit

def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, fan_in_fan_out) of a layer LoRA can wrap, else None.

    GPT-2's `Conv1D` stores its weight as [in, out] (fan_in_fan_out); the others as [out, in].
    """
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], True
    if isinstance(module, (nn.Linear, Linear4bit)):
        return module.in_features, module.out_features, False
    return None


class LoraLinear(nn.Module):
    """`y = base(x) + scaling · lora_B(lora_A(dropout(x)))` around a frozen base layer.

    Args:
        base_layer: `nn.Linear`, `trilora.quant.Linear4bit` or transformers' `Conv1D`; kept as
            the submodule `base_layer` (state-dict keys `<name>.base_layer.weight`, as PEFT's).
        r, alpha, dropout, use_rslora, init_lora_weights: see `LoraConfig`.
        backend: the `lora_linear` backend ("auto", "triton", "torch"); a plain attribute, so
            it can be changed after construction.

    lora_A is `nn.Linear(in, r)` (weight [r, in]) and lora_B `nn.Linear(r, out)` ([out, r]),
    fp32 on the base weight's device, as PEFT keeps them. The forward casts them to the
    compute dtype at call time (autograd casts the gradients back to fp32), because the fused
    op takes every operand in one dtype.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, backend: str = "auto",
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        dims = linear_dims(base_layer)
        if dims is None:
            raise TypeError(f"LoRA wraps nn.Linear, trilora Linear4bit or transformers Conv1D, "
                            f"got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features, self.fan_in_fan_out = dims
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.disabled = False  # True: the base layer alone (PEFT's disable_adapter)
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.backend = backend
        self.merged = False  # True while the delta is folded into a dense base weight
        self.reset_lora_parameters(init_lora_weights)
        self.train(base_layer.training)  # an adapter injected into an eval-mode model must not drop out

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisations: True → A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0 (the
        layer starts as the base layer); "gaussian" → A ~ N(0, 1/r²), B = 0; False → both
        kaiming_uniform, like a fresh nn.Linear."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)

    def __setattr__(self, name: str, value) -> None:
        # PEFT's get_peft_model on a trilora model ("all-linear") would nest its own LoRA
        # inside this layer's linears: two adapter systems training at once. Refuse it here,
        # where PEFT swaps the module in, before anything is replaced.
        if name in ("base_layer", "lora_A", "lora_B") and type(value).__module__.startswith("peft."):
            raise ValueError("this model already carries trilora LoRA adapters: PEFT cannot add its own on top "
                             "(one adapter system per model). Drop the peft_config / get_peft_model call and "
                             "train trilora's adapter, or start from a fresh base model for PEFT")
        super().__setattr__(name, value)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, fp32 [out, in] (the update in nn.Linear's layout, whatever the base)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out] in x's dtype."""
        base = self.base_layer
        if self.merged or self.disabled:
            return base(x)
        if isinstance(base, Linear4bit):
            # the 4-bit layer's compute dtype, as Linear4bit.forward uses it
            dtype = base.compute_dtype or x.dtype
            weight, quant_state = base.weight, base.quant_state
        else:
            dtype = x.dtype
            # Conv1D holds Wᵀ [in, out]: its transpose is an [out, in] view, no copy
            weight = (base.weight.t() if self.fan_in_fan_out else base.weight).to(dtype)
            quant_state = None
        bias = None if base.bias is None else base.bias.to(dtype)
        y = kernels.lora_linear(x.to(dtype), weight, self.lora_A.weight.to(dtype),
                                self.lora_B.weight.to(dtype), self.scaling, bias,
                                self.dropout if self.training else 0.0, quant_state, backend=self.backend)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, backend={self.backend!r}, merged={self.merged}")


class TrainableCopy(nn.Module):
    """A module of `modules_to_save`: the forward runs a trainable full copy (`trained`), the
    frozen original stays in `original_module` (like PEFT's ModulesToSaveWrapper).

    Attribute reads the wrapper does not have go to the copy, so model code that reads e.g.
    `model.score.weight` keeps working.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trained = copy.deepcopy(module)
        for p in module.parameters():
            p.requires_grad_(False)
        for p in self.trained.parameters():
            p.requires_grad_(True)
        self.train(module.training)

    disabled = False  # True: the frozen original runs (PEFT's disable_adapter)

    def forward(self, *args, **kwargs):
        return (self.original_module if self.disabled else self.trained)(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "trained" or "trained" not in modules:
                raise
            return getattr(modules["trained"], name)


__all__ = ["LoraLinear", "TrainableCopy", "linear_dims"]
