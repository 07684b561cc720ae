"""`LoraLinear`: a frozen linear layer plus a trainable low-rank update, and `TrainableCopy`.

The forward is one call to `trilora.kernels.lora_linear`, so the layer runs whatever that op
dispatches to (fused Triton kernels on CUDA, the PyTorch reference on CPU) and picks up new
kernels without changes here.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from trilora import kernels
from trilora.kernels.backend import resolve_backend
from trilora.kernels.lora.dora import dora_weight_norm
from trilora.quant import Linear4bit

def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, fan_in_fan_out) of a layer LoRA can wrap, else None.

    GPT-2's `Conv1D` stores its weight as [in, out] (fan_in_fan_out); the others as [out, in].
    """
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features, module.fan_in_fan_out
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], True
    if isinstance(module, (nn.Linear, Linear4bit)):
        return module.in_features, module.out_features, False
    return None


@dataclass
class AdapterSettings:
    """One adapter's hyper-parameters inside a `LoraLinear`."""
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class _AdapterDict(nn.ModuleDict):
    """`lora_A` / `lora_B`: adapter name → nn.Linear (PEFT's layout, so the state-dict keys are
    PEFT's: `<layer>.lora_A.<adapter>.weight`). Refuses PEFT's layers: PEFT's "all-linear"
    would otherwise wrap these very linears in its own LoRA."""

    def __setattr__(self, name: str, value) -> None:
        _refuse_peft(value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, module: nn.Module) -> None:
        _refuse_peft(module)
        super().__setitem__(key, module)


def _refuse_peft(value) -> None:
    if isinstance(value, nn.Module) and type(value).__module__.startswith("peft."):
        raise ValueError("this model already carries trilora LoRA adapters: PEFT cannot add its own on top "
                         "(one adapter system per model). Drop the peft_config / get_peft_model call and "
                         "train trilora's adapter, or start from a fresh base model for PEFT")


def _initialise(A: torch.Tensor, B: torch.Tensor, init_lora_weights: bool | str, r: int) -> None:
    if init_lora_weights == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        nn.init.zeros_(B)


class Magnitude(nn.Module):
    """A DoRA adapter's magnitude vector m [out] (PEFT's `lora_magnitude_vector.<name>.weight`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class LoraLinear(nn.Module):
    """`y = base(x) + scaling · lora_B(lora_A(dropout(x)))` around a frozen base layer.

    Args:
        base_layer: `nn.Linear`, `trilora.quant.Linear4bit` or transformers' `Conv1D`; kept as
            the submodule `base_layer` (state-dict keys `<name>.base_layer.weight`, as PEFT's).
        r, alpha, dropout, use_rslora, init_lora_weights: see `LoraConfig`.
        backend: the `lora_linear` backend ("auto", "triton", "torch"); a plain attribute, so
            it can be changed after construction.
        adapter_name: the first adapter's name ("default", as PEFT's).

    A layer can hold several named adapters (`add_adapter`); one is active (`active_adapter`)
    and the forward runs it alone. `r`, `alpha`, `dropout`, `use_rslora` and `scaling` read
    the active adapter's settings. Each adapter's lora_A is `nn.Linear(in, r)` (weight
    [r, in]) and lora_B `nn.Linear(r, out)` ([out, r]), fp32 on the base weight's device, as
    PEFT keeps them; the forward casts them to the compute dtype at call time (autograd casts
    the gradients back to fp32), because the fused op takes every operand in one dtype.
    A layer whose active adapter it does not hold (an adapter that targets other layers)
    runs the base layer alone, as PEFT's does.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True, backend: str = "auto",
                 adapter_dtype: torch.dtype = torch.float32, adapter_name: str = "default", use_dora: bool = False):
        super().__init__()
        dims = linear_dims(base_layer)
        if dims is None or isinstance(base_layer, LoraLinear):
            raise TypeError(f"LoRA wraps nn.Linear, trilora Linear4bit or transformers Conv1D, "
                            f"got {type(base_layer).__name__}")
        self.in_features, self.out_features, self.fan_in_fan_out = dims
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A, self.lora_B = _AdapterDict(), _AdapterDict()
        self.lora_magnitude_vector = _AdapterDict()  # DoRA adapters' m
        self.settings: dict[str, AdapterSettings] = {}
        self.active_adapter = adapter_name
        self.disabled = False  # True: the base layer alone (PEFT's disable_adapter)
        self.backend = backend
        self.merged = False  # True while the active adapter is folded into a dense base weight
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init_lora_weights, adapter_dtype, use_dora)
        self.train(base_layer.training)  # an adapter injected into an eval-mode model must not drop out

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init_lora_weights: bool | str = True, adapter_dtype: torch.dtype = torch.float32,
                    use_dora: bool = False) -> None:
        """Add adapter `name` (trainable; `set_active` decides which adapters train). A DoRA
        adapter's magnitude starts as ‖W + s·BA‖ per row (fp32), so the layer starts as the
        LoRA layer would (PEFT's initialisation)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.settings[name] = AdapterSettings(r, alpha, float(dropout), use_rslora, bool(use_dora))
        self.reset_lora_parameters(init_lora_weights, name)
        if use_dora and device.type == "meta":  # a skeleton: the loader sets m once the base is read
            self.lora_magnitude_vector[name] = Magnitude(torch.empty(self.out_features, device=device,
                                                                     dtype=adapter_dtype))
        elif use_dora:
            A, B = self.adapter_weights(name)
            norm = dora_weight_norm(self._dense_weight(torch.float32), A.float(), B.float(), self.settings[name].scaling)
            self.lora_magnitude_vector[name] = Magnitude(norm.to(adapter_dtype))

    def delete_adapter(self, name: str) -> None:
        if name == self.active_adapter and self.merged:
            raise ValueError(f"adapter {name!r} is merged into the base weight: unmerge it first")
        del self.lora_A[name], self.lora_B[name], self.settings[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def set_active(self, name: str, trainable: bool = True) -> None:
        """Make `name` the adapter the forward runs (this layer need not hold it); its weights
        train when `trainable`, every other adapter's are frozen (PEFT's set_adapter)."""
        if self.merged and name != self.active_adapter:
            raise ValueError(f"adapter {self.active_adapter!r} is merged into the base weight: unmerge it before "
                             f"switching to {name!r}")
        self.active_adapter = name
        for key in self.lora_A:
            for p in self.adapter_parameters(key):
                p.requires_grad_(trainable and key == name)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name`: A, B (and a DoRA adapter's magnitude)."""
        params = [*self.lora_A[name].parameters(), *self.lora_B[name].parameters()]
        if name in self.lora_magnitude_vector:
            params += list(self.lora_magnitude_vector[name].parameters())
        return params

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    @property
    def runs_adapter(self) -> bool:
        """True when the forward adds the active adapter's update (not merged, not disabled,
        and this layer holds the active adapter)."""
        return not (self.merged or self.disabled) and self.active_adapter in self.lora_A

    def _active_settings(self) -> AdapterSettings:
        try:
            return self.settings[self.active_adapter]
        except KeyError:
            raise AttributeError(f"this layer has no adapter {self.active_adapter!r} (it has "
                                 f"{self.adapter_names})") from None

    r = property(lambda self: self._active_settings().r)
    use_dora = property(lambda self: self._active_settings().use_dora)
    alpha = property(lambda self: self._active_settings().alpha)
    use_rslora = property(lambda self: self._active_settings().use_rslora)
    scaling = property(lambda self: self._active_settings().scaling)

    @property
    def dropout(self) -> float:
        return self._active_settings().dropout

    @dropout.setter
    def dropout(self, p: float) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self._active_settings().dropout = float(p)

    def adapter_weights(self, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of adapter `name` (default: the active one)."""
        name = self.active_adapter if name is None else name
        return self.lora_A[name].weight, self.lora_B[name].weight

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True, name: str | None = None) -> None:
        """PEFT's initialisations: True → A ~ kaiming_uniform(a=√5) = U(±1/√in), B = 0 (the
        layer starts as the base layer); "gaussian" → A ~ N(0, 1/r²), B = 0; False → both
        kaiming_uniform, like a fresh nn.Linear."""
        name = self.active_adapter if name is None else name
        _initialise(*self.adapter_weights(name), init_lora_weights, self.settings[name].r)

    @torch.no_grad()
    def initial_adapter_weights(self, name: str, init_lora_weights: bool | str = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as `add_adapter` draws them for adapter `name` from the random generators'
        present state, drawing the same numbers (nn.Linear's own initialisation of both, then
        `reset_lora_parameters`): an adapter added on a `meta` skeleton gets them once its
        memory exists, the values it would have had on a loaded model."""
        A, B = (torch.empty_like(w) for w in self.adapter_weights(name))
        for w in (A, B):  # what constructing nn.Linear(in, r) and nn.Linear(r, out) draws
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        _initialise(A, B, init_lora_weights, self.settings[name].r)
        return A, B

    def __setattr__(self, name: str, value) -> None:
        # PEFT's get_peft_model on a trilora model ("all-linear") would nest its own LoRA
        # inside this layer: two adapter systems training at once. Refuse it here, where PEFT
        # swaps the module in, before anything is replaced.
        if name in ("base_layer", "lora_A", "lora_B", "lora_magnitude_vector"):
            _refuse_peft(value)
        super().__setattr__(name, value)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """scaling · B A of adapter `name` (default: the active one), fp32 [out, in] (the
        update in nn.Linear's layout, whatever the base)."""
        name = self.active_adapter if name is None else name
        A, B = self.adapter_weights(name)
        return (B.float() @ A.float()) * self.settings[name].scaling

    def merged_weight(self, weight: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """The dense weight the adapter folds into, fp32 [out, in], from the base's fp32
        `weight` [out, in]: W + s·BA, or for DoRA m ⊙ (W + s·BA) / ‖W + s·BA‖_row (PEFT's merge)."""
        name = self.active_adapter if name is None else name
        merged = weight + self.delta_weight(name).to(weight.device)
        if not self.settings[name].use_dora:
            return merged
        m = self.lora_magnitude_vector[name].weight.detach().float().to(weight.device)
        self._dora_merge_scale = m / torch.linalg.norm(merged, dim=1)  # what unmerged_weight divides out
        return self._dora_merge_scale[:, None] * merged

    def unmerged_weight(self, merged: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """The base's fp32 weight back from `merged_weight`'s result (DoRA: from the rescale
        remembered when it was merged)."""
        name = self.active_adapter if name is None else name
        if self.settings[name].use_dora:
            merged = merged / self._dora_merge_scale.to(merged.device)[:, None]
        return merged - self.delta_weight(name).to(merged.device)

    def base_sq_norm(self, device: torch.device) -> torch.Tensor:
        """‖W‖² per row of the frozen base, fp32 [out]: the constant part of the DoRA norm,
        computed once per device (merging into the base clears it: `forget_base_norm`)."""
        cache = self.__dict__.setdefault("_base_sq_cache", {})
        if device not in cache:
            with torch.no_grad():
                cache[device] = self._dense_weight(torch.float32).square().sum(1).to(device)
        return cache[device]

    def forget_base_norm(self) -> None:
        self.__dict__.pop("_base_sq_cache", None)

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight [out, in] in `dtype` (a 4-bit one dequantized; Conv1D's transposed)."""
        base = self.base_layer
        if isinstance(base, Linear4bit):
            return base.dequantize(dtype)
        return (base.weight.t() if self.fan_in_fan_out else base.weight).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] → [..., out] in x's dtype."""
        base = self.base_layer
        if not self.runs_adapter:
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
        A, B = self.adapter_weights()
        p = self.dropout if self.training else 0.0
        if self.use_dora:
            m = self.lora_magnitude_vector[self.active_adapter].weight
            fused = resolve_backend(self.backend, x) == "triton"
            y = kernels.dora_linear(x.to(dtype), weight, A.to(dtype), B.to(dtype), self.scaling, m, bias, p,
                                    quant_state, backend=self.backend,
                                    weight_sq=self.base_sq_norm(x.device) if fused else None)
        else:
            y = kernels.lora_linear(x.to(dtype), weight, A.to(dtype), B.to(dtype), self.scaling, bias, p,
                                    quant_state, backend=self.backend)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={s.r}, alpha={s.alpha}, scaling={s.scaling:.4g}, dropout={s.dropout}"
                             + (", dora" if s.use_dora else "") for n, s in self.settings.items())
        return (f"{{{adapters}}}, active={self.active_adapter!r}, fan_in_fan_out={self.fan_in_fan_out}, "
                f"backend={self.backend!r}, merged={self.merged}")


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


__all__ = ["AdapterSettings", "LoraLinear", "Magnitude", "TrainableCopy", "linear_dims"]
